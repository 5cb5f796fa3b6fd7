"""The PyTorch backend (user-facing name "reference"): the operator composed of PyTorch ops
(cuBLAS on a GPU, oneDNN / MKL on a CPU); the CPU path.

Contract shared by all backends (x is 2-D, (M, K)):

``forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout) -> (y, p)``
    y = x Wᵀ + bias + scaling · p · B_effᵀ  in x's dtype, and p = dropout(x) Aᵀ (M, r) in the
    adapters' dtype; p is what backward needs instead of x when A is frozen.

``backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None, need_x,
need_a, need_b, need_latent=False, need_bias) -> (dx, da, db, dr, dbias)``
    Gradients asked for, ``None`` for the rest. ``x`` may be ``None`` unless ``need_a``; ``p``
    may be ``None`` unless ``need_b`` or ``need_latent``. Each gradient has its own tensor's
    dtype. With a ``latent`` R (LoRA-XS; forward ran on B_eff = B·Rᵀ) the pass over G runs on B
    and P·R (``latent_operands``): it gives T = s·G·B and dB = s·Gᵀ·P·R at once, then
    dP = T·Rᵀ and dR = Pᵀ·T (``latent_gradients``). So dR needs no dB_eff (no N x r reduction,
    no atomics when B is frozen) and never rounds P to a 16-bit dot operand.

``weight`` may be a 4-bit ``quantized.Packed4bit`` (bitsandbytes' NF4 / FP4 format): this backend
dequantizes it to x's dtype per call, forward and backward, as ``bnb.matmul_4bit`` does (the
dense N x K tensor is a transient, dropped after its GEMM). The Triton backend dequantizes
inside its GEMMs' K loops instead; 4-bit DoRA (QDoRA) runs here (``dispatch.select``).

``dropout_keep_mask(dropout, shape, device) -> bool tensor``
    The keep-mask the backend derives from ``dropout.seed``: True where x is kept.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ..dropout import DropoutSpec, fast_keep_mask, keep_mask_chunks

NAME = "reference"  # the user-facing name: backend="reference"


def dropout_keep_mask(dropout: DropoutSpec, shape, device) -> Tensor:
    # the bits of dropout.keep_mask, the definition (tests/test_dropout_mask.py)
    return fast_keep_mask(dropout.seed, dropout.p, tuple(shape), device)


def _mask_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t * keep * scale`` is computed in (torch's opmath: fp32 for 16-bit t), so a
    mask holding 0 / scale in it gives the same values as the two multiplies."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dropout_chunks(t: Tensor, dropout: DropoutSpec):
    """(rows, mask) chunks of the keep-mask of t's shape, the mask holding 0 or keep_scale in
    _mask_dtype(t): a view the next chunk overwrites."""
    scale = dropout.keep_scale
    for rows, mask in keep_mask_chunks(dropout.seed, dropout.p, tuple(t.shape), t.device,
                                       _mask_dtype(t)):
        yield rows, mask.mul_(scale)


def _dropped(t: Tensor, dropout: DropoutSpec, dtype: torch.dtype, masks=None) -> Tensor:
    """t * keep * scale, computed in t's opmath dtype, written in ``dtype``; each mask chunk is
    also handed to ``masks(rows, mask)`` (backward applies it to the dx term with the same
    chunk), so the mask is made once per pass and never whole."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    for rows, mask in _dropout_chunks(t, dropout):
        torch.mul(t[rows], mask, out=out[rows])
        if masks is not None:
            masks(rows, mask)
    return out


def _apply_dropout(t: Tensor, dropout: Optional[DropoutSpec]) -> Tensor:
    if dropout is None:
        return t
    # A multiply, not a select: NaN/Inf in dropped elements give NaN, as F.dropout does.
    return _dropped(t, dropout, t.dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the call when it already is (a no-op .to still costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dense(weight, dtype: torch.dtype) -> Tensor:
    """A dense W as it is; a ``quantized.Packed4bit`` dequantized to ``dtype`` (a transient)."""
    return weight if isinstance(weight, Tensor) else weight.dequantize(dtype)


_FACTORS: dict = {}  # (scaling, dtype) -> 0-d tensor


def _scaled_(t: Tensor, scaling: float) -> Tensor:
    """t *= scaling, in place. By a cached 0-d tensor in t's opmath dtype: the same bits as a
    Python float (which costs a wrapped tensor on every call, a microsecond on small shapes)."""
    if scaling == 1.0:
        return t
    key = (scaling, t.dtype)
    factor = _FACTORS.get(key)
    if factor is None:
        if len(_FACTORS) >= 256:
            _FACTORS.clear()
        opmath = torch.float64 if t.dtype == torch.float64 else torch.float32
        factor = _FACTORS[key] = torch.tensor(scaling, dtype=opmath)
    return t.mul_(factor)


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    x_low = _as(x, lora_a.dtype) if dropout is None else _dropped(x, dropout, lora_a.dtype)
    p = torch.nn.functional.linear(x_low, lora_a)
    y = torch.nn.functional.linear(x, _dense(weight, x.dtype), bias)
    if _fused_add(x, lora_a):
        y.addmm_(p, lora_b_eff.t(), alpha=scaling)
    else:
        y += _as(_scaled_(torch.mm(p, lora_b_eff.t()), scaling), x.dtype)
    return y, p


def _fused_add(x: Tensor, lora_a: Tensor) -> bool:
    """Whether a low-rank term may be added by addmm_ (no M x N temporary): one dtype, 32 or 64
    bits. A 16-bit addmm_ would round once where the separate product rounds twice, and the
    kernels' tests measure PyTorch's 16-bit error on this backend (tests/tolerance.py)."""
    return x.dtype == lora_a.dtype and x.dtype in (torch.float32, torch.float64)


def _plus_low_rank(dx: Tensor, dp: Tensor, lora_a: Tensor, dtype: torch.dtype) -> Tensor:
    """dx + dP·A (in place where the dtypes allow one addmm), in ``dtype``."""
    if _fused_add(dx, lora_a):
        dx.addmm_(dp, lora_a)
    else:
        dx += _as(dp @ lora_a, dx.dtype)
    return _as(dx, dtype)


def latent_operands(p, latent, need_b):
    """P's stand-in for the pass over G: P·R with a latent R (where dB is asked for), else P."""
    if latent is None or not need_b:
        return p
    return p @ _as(latent, p.dtype)


def latent_gradients(t, p, latent, need_dp, need_latent):
    """(dP, dR) from T = s·G·B, the pass over G's r-wide result, with a latent R; both r-wide
    products in T's dtype (fp32 from the kernels), dR then in R's dtype."""
    dp = t @ _as(latent, t.dtype).T if need_dp else None
    dr = _as(_as(p, t.dtype).T @ t, latent.dtype) if need_latent else None
    return dp, dr


def backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    adapter_dtype = lora_a.dtype
    grad_lr = _as(grad_y, adapter_dtype)
    need_latent = need_latent and latent is not None
    dx = da = db = dr = dbias = None
    dp = None
    if need_x or need_a or need_latent:
        dp = _scaled_(torch.mm(grad_lr, lora_b), scaling)  # (M, r); T = s·G·B with a latent
        if latent is not None:
            dp, dr = latent_gradients(dp, p, latent, need_x or need_a, need_latent)
        if dropout is None:
            if need_x:
                dx = _plus_low_rank(torch.mm(grad_y, _dense(weight, grad_y.dtype)), dp, lora_a,
                                    grad_y.dtype)
            if need_a:
                da = torch.mm(dp.t(), _as(x, adapter_dtype))
        else:
            # One mask for both terms: dx's dropout(dP·A) and dA's dropout(x), chunk by chunk.
            low = dp @ lora_a if need_x else None

            def drop_low(rows, mask):
                low[rows].mul_(mask)

            if need_a:
                x_low = _dropped(x, dropout, adapter_dtype, drop_low if need_x else None)
                da = dp.T @ x_low
            elif need_x:
                for rows, mask in _dropout_chunks(low, dropout):
                    drop_low(rows, mask)
            if need_x:
                dx = grad_y @ _dense(weight, grad_y.dtype)
                dx += _as(low, dx.dtype)
                dx = _as(dx, grad_y.dtype)
    if need_b:
        db = _scaled_(torch.mm(grad_lr.t(), latent_operands(p, latent, need_b)), scaling)
    if need_bias:
        dbias = grad_y.sum(0)
    return dx, da, db, dr, dbias


# DoRA (lowrank_fused.dora): c = m / ‖W + s·B_eff·A‖_row, detached, given as an (N,) vector in
# the accumulation dtype (fp32, fp64 for fp64 tensors). The Triton backend has the same two
# functions (its kernels fuse c); dispatch.select routes "cuda" there.
#
# How this path is made cheap on a CPU (each M x N elementwise pass over a 1024 x 1376 fp32
# activation costs about a tenth of the GEMM beside it):
# - the column scale c is folded into the rows of W and B where it multiplies a product
#   (c ⊙ (G·W) = (c ⊙ G)·W = G·(c ⊙ W) and so on): an N x K (or N x r) scaled copy per call in
#   place of an M x N pass;
# - the M x N terms that remain (Z, the (c − 1) term, dm's product) run over row chunks of
#   about _CHUNK_ELEMENTS elements, so their temporaries stay cache-sized;
# - dm = Σ_rows G ⊙ Z is a product and a column sum per chunk (torch.einsum("mn,mn->n") ran as a
#   batched matmul that copied every column: half the layer's step time);
# - with dropout the extra product x̃·Wᵀ and its gradient ((c − 1) ⊙ G)·W run in the
#   accumulation dtype, as PEFT runs its DoRA branch (on x cast to the adapters' fp32); at a
#   small rate (<= _SPARSE_DROPOUT_MAX_P, on a CPU) they are a sparse product over the dropped
#   entries and a sampled one beside one dense GEMM each way (_dora_forward_sparse,
#   _dora_dx_sparse) instead of two;
# - 16-bit GEMMs run as fp32 GEMMs on a CPU without 16-bit kernels (_gemm_dtype).

_CHUNK_ELEMENTS = 1 << 16  # elements per row chunk of an M x N pass (256 KiB in fp32)


_NATIVE_16BIT: dict = {}


def _gemm_dtype(t: Tensor) -> torch.dtype:
    """The dtype a product of 16-bit ``t`` runs in on this path: its own, except on a CPU whose
    oneDNN has no kernels for it (no avx512_bf16 / AMX / avx512_fp16: the 16-bit products are
    emulated, 7-30x slower than fp32 on an AVX2 machine), where the operands are upcast exactly
    to fp32 and accumulated in fp32: the values of a 16-bit GEMM with fp32 accumulation."""
    if t.dtype not in (torch.bfloat16, torch.float16) or t.device.type != "cpu":
        return t.dtype
    native = _NATIVE_16BIT.get(t.dtype)
    if native is None:
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported",
                 torch.float16: "_is_mkldnn_fp16_supported"}[t.dtype]
        try:
            native = bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):
            native = True  # unknown: keep the 16-bit product
        _NATIVE_16BIT[t.dtype] = native
    return t.dtype if native else torch.float32


def _row_chunks(rows: int, cols: int):
    """Slices of ``rows`` rows, about _CHUNK_ELEMENTS elements of a ``cols``-wide matrix each."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _scaled_rows(t: Tensor, col: Tensor, dtype: torch.dtype, scaling: float = 1.0) -> Tensor:
    """scaling · (col ⊙ t) (rows of t times an (N, 1) column), computed in col's dtype and
    written in ``dtype``."""
    out = _as(t, col.dtype) * col
    if scaling != 1.0:
        out.mul_(scaling)
    return _as(out, dtype)


def _column_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """Σ_rows a ⊙ b (an (N,) vector in ``acc``), one row chunk at a time."""
    rows, cols = a.shape
    out = torch.zeros(cols, dtype=acc, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    buf = torch.empty((min(step, rows), cols), dtype=acc, device=a.device)
    for sl in _row_chunks(rows, cols):
        chunk = buf[: sl.stop - sl.start]
        if a.dtype == acc and b.dtype == acc:
            torch.mul(a[sl], b[sl], out=chunk)
        else:  # products of 16-bit values are exact in fp32
            chunk.copy_(a[sl]).mul_(b[sl])
        out += chunk.sum(0)
    return out


def _low_rank_chunk(p: Tensor, lora_b_eff: Tensor, scaling: float, acc: torch.dtype) -> Tensor:
    """s·P·B_effᵀ for one row chunk of P, in the adapters' dtype, then in ``acc``."""
    return _as((p @ lora_b_eff.T).mul_(scaling), acc)


# Dropout at a small rate: x̃·Wᵀ = scale·(x·Wᵀ − D·Wᵀ), D = x ⊙ (1 − keep) holding the dropped
# entries only (p of them: a sparse CSR matrix), so the forward's second product over W is a
# sparse one; in backward, dropout(((c − 1) ⊙ G)·W) = scale·G·((c − 1) ⊙ W) minus the dropped
# entries of it (a sampled product at D's pattern), so G·W and it become one GEMM over
# (1 + scale·(c − 1)) ⊙ W. Exact algebra; the rounding is a GEMM's (relative to |x|·|W|).
_SPARSE_DROPOUT_MAX_P = 0.1  # above this rate the sparse products stop paying (CPU, MKL)


def _sparse_dropout(x: Tensor, dropout: DropoutSpec) -> bool:
    return (dropout.p <= _SPARSE_DROPOUT_MAX_P and x.device.type == "cpu" and not x.is_meta
            and x.dim() == 2 and x.numel() > 0)


def _dropped_pattern(dropout: DropoutSpec, shape, device):
    """(crow, col, flat): the dropped entries of the keep-mask in row-major (CSR) order, as CSR
    row pointers and columns, and as flat indices into an (M, K) tensor."""
    drop = ~dropout_keep_mask(dropout, shape, device)
    flat = drop.view(-1).nonzero().squeeze(1)                      # ascending
    # row i starts at the first entry >= i·K (a bool row sum costs more than the mask)
    step = max(shape[1], 1)
    crow = torch.searchsorted(flat, torch.arange(0, (shape[0] + 1) * step, step, device=device))
    return crow, flat % step, flat


def _csr(pattern, values: Tensor, shape) -> Tensor:
    crow, col, _ = pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape))


def dora_forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *, need_z):
    """(y, p, z): y by DoRA's rule (no dropout: c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias; with dropout,
    PEFT's x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ), p = x̃·Aᵀ, and z = x̃·Wᵀ + s·P·B_effᵀ
    in x's dtype when ``need_z`` (what dm needs), else None. x̃ is a transient (in the
    accumulation dtype, as PEFT's DoRA branch computes it)."""
    acc = c.dtype
    col = c.unsqueeze(1)
    w = _dense(weight, x.dtype)
    if dropout is None:
        p = _as(x, lora_a.dtype) @ lora_a.T
        if not need_z and x.dtype == acc and lora_a.dtype == acc:
            # c folded into W's and B's rows: y = x·(c ⊙ W)ᵀ + P·(s·c ⊙ B_eff)ᵀ + bias, no M x N pass
            y = torch.nn.functional.linear(x, _scaled_rows(w, col, acc), bias)
            y.addmm_(p, _scaled_rows(lora_b_eff, col, acc, scaling).T)
            return y, p, None
        gd = _gemm_dtype(x)
        # with a bias, PEFT's order: base = x·Wᵀ + bias (the base layer's own addmm), then
        # y = base + (c − 1) ⊙ x·Wᵀ + c ⊙ s·P·B_effᵀ, so y is the base output bit for bit where
        # c = 1 and B = 0 (PEFT's initialisation, which its own tests compare at atol 1e-8)
        z = torch.nn.functional.linear(_as(x, gd), _as(w, gd), None if bias is None
                                       else _as(bias, gd))  # x·Wᵀ (+ bias); becomes Z in place
        y = torch.empty(z.shape, dtype=x.dtype, device=z.device)
        z_keep = None
        if need_z:
            z_keep = z if z.dtype == x.dtype else torch.empty_like(y)
        bias_acc = None if bias is None else _as(bias, acc)
        c_minus_1 = c - 1.0
        for rows in _row_chunks(*z.shape):
            zc = _as(z[rows], acc)                          # a view when z is in acc
            low = _low_rank_chunk(p[rows], lora_b_eff, scaling, acc)
            if bias_acc is None:
                zc += low
                torch.mul(zc, c, out=y[rows])
            else:                                           # zc: the base output
                y[rows].copy_(torch.addcmul(zc, zc - bias_acc, c_minus_1).addcmul_(low, c))
                zc.sub_(bias_acc).add_(low)
            if z_keep is not None and (zc.dtype != z.dtype or z_keep is not z):
                z_keep[rows].copy_(zc)
        return y, p, z_keep
    # with dropout: y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ
    if _sparse_dropout(x, dropout):
        return _dora_forward_sparse(x, w, bias, lora_a, lora_b_eff, scaling, dropout, c, need_z)
    x_drop = _dropped(x, dropout, acc)
    p = _as(x_drop, lora_a.dtype) @ lora_a.T
    z = torch.nn.functional.linear(x_drop, _as(w, acc))    # x̃·Wᵀ in acc; becomes Z in place
    del x_drop
    gd = _gemm_dtype(x)                                     # the base layer's own term
    y = _as(torch.nn.functional.linear(_as(x, gd), _as(w, gd), _as(bias, gd) if bias is not None
                                       else None), x.dtype)
    z_keep = None
    if need_z:
        z_keep = z if x.dtype == acc else torch.empty(z.shape, dtype=x.dtype, device=z.device)
    c_minus_1 = c - 1.0
    for rows in _row_chunks(*z.shape):
        zc = z[rows]
        yc = _as(y[rows], acc)                               # a view when x is in acc
        yc.addcmul_(zc, c_minus_1)
        low = _low_rank_chunk(p[rows], lora_b_eff, scaling, acc)
        yc.addcmul_(low, c)
        if yc.dtype != y.dtype:
            y[rows].copy_(yc)
        _keep_z_rows(z_keep, z, rows, zc, low)
    return y, p, z_keep


def _keep_z_rows(z_keep, z, rows, zc, low) -> None:
    """Z's rows when Z is kept: zc (x̃·Wᵀ, a view of ``z``) += s·P·B_effᵀ, copied into
    ``z_keep`` unless that is ``z`` itself."""
    if z_keep is not None:
        zc += low
        if z_keep is not z:
            z_keep[rows].copy_(zc)


def _dora_forward_sparse(x, w, bias, lora_a, lora_b_eff, scaling, dropout, c, need_z):
    """dora_forward with dropout at a small rate: one GEMM x·Wᵀ (in acc) and the sparse D·Wᵀ
    give both x·Wᵀ and x̃·Wᵀ = scale·(x·Wᵀ − D·Wᵀ); P = scale·(x·Aᵀ − D·Aᵀ)."""
    acc = c.dtype
    scale = dropout.keep_scale
    pattern = _dropped_pattern(dropout, x.shape, x.device)
    x_acc, w_acc = _as(x, acc), _as(w, acc)
    d = _csr(pattern, x_acc.reshape(-1)[pattern[2]], x.shape)      # D = x ⊙ (1 − keep)
    a_acc = _as(lora_a, acc)
    p = _as(torch.sub(x_acc @ a_acc.T, d @ a_acc.T).mul_(scale), lora_a.dtype)
    v = torch.nn.functional.linear(x_acc, w_acc)                    # x·Wᵀ; becomes y in acc
    u = d @ w_acc.T.contiguous()                                    # D·Wᵀ; becomes x̃·Wᵀ, then Z
    del d, x_acc
    y = v if x.dtype == acc else torch.empty(v.shape, dtype=x.dtype, device=v.device)
    z_keep = None
    if need_z:
        z_keep = u if x.dtype == acc else torch.empty(u.shape, dtype=x.dtype, device=u.device)
    bias_acc = None if bias is None else _as(bias, acc)
    c_minus_1 = c - 1.0
    for rows in _row_chunks(*v.shape):
        vc, uc = v[rows], u[rows]
        torch.sub(vc, uc, out=uc).mul_(scale)                       # x̃·Wᵀ
        low = _low_rank_chunk(p[rows], lora_b_eff, scaling, acc)
        if bias_acc is not None:
            vc += bias_acc
        vc.addcmul_(uc, c_minus_1).addcmul_(low, c)
        if y is not v:
            y[rows].copy_(vc)
        _keep_z_rows(z_keep, u, rows, uc, low)
    return y, p, z_keep


def _dora_dx_sparse(grad_y, w, dp, lora_a, dropout, c):
    """dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A) at a small dropout rate, in acc:
    G·((1 + scale·(c − 1)) ⊙ W) + scale·dP·A, minus scale·(((c − 1) ⊙ G)·W + dP·A) at the
    dropped entries (a sampled product there), one GEMM over G instead of two."""
    acc = c.dtype
    scale = dropout.keep_scale
    col = c.unsqueeze(1)
    g_acc, w_acc = _as(grad_y, acc), _as(w, acc)
    w_c = _scaled_rows(w_acc, col - 1.0, acc)                       # (c − 1) ⊙ W
    dx = g_acc @ torch.add(w_acc, w_c, alpha=scale)
    low = _as(dp, acc) @ _as(lora_a, acc)                           # dP·A
    dx.add_(low, alpha=scale)
    pattern = _dropped_pattern(dropout, dx.shape, dx.device)
    flat = pattern[2]
    if flat.numel():
        zeros = torch.zeros(flat.numel(), dtype=acc, device=dx.device)
        dropped = torch.sparse.sampled_addmm(_csr(pattern, zeros, dx.shape), g_acc, w_c,
                                             beta=0.0).values()
        dropped += low.view(-1)[flat]
        dx.view(-1).index_add_(0, flat, dropped, alpha=-scale)
    return _as(dx, grad_y.dtype)


def dora_backward(grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling, dropout, c, norm, *,
                  need_x, need_a, need_b, need_latent, need_bias, need_m, z_is_output=False):
    """(dx, dA, dB, dR, dbias, dm): the plain backward for G' = c ⊙ G (c folded into the rows of
    W and B, G' never formed), plus with dropout dx += H − dropout(H), H = ((1 − c) ⊙ G)·W;
    dm = Σ_rows G ⊙ Z / ‖·‖ (c detached). ``z_is_output``: z is the output y (no dropout, no bias),
    Z = y / c, so dm = Σ_rows G ⊙ y / (c·‖·‖)."""
    acc = c.dtype
    adapter_dtype = lora_a.dtype
    col = c.unsqueeze(1)
    g_low = _as(grad_y, adapter_dtype)
    dx = da = db = dr = dp = None
    if need_x or need_a or need_latent:
        dp = g_low @ _scaled_rows(lora_b, col, adapter_dtype, scaling)  # s·(c ⊙ G)·B: T with a latent
        if latent is not None:
            dp, dr = latent_gradients(dp, p, latent, need_x or need_a, need_latent)
    if need_b:
        db = _scaled_rows(g_low.T @ latent_operands(p, latent, need_b), col, lora_b.dtype,
                          scaling)                         # s·(c ⊙ G)ᵀ·(P·R)
    if need_x or need_a:
        w = _dense(weight, grad_y.dtype) if need_x else None
        if dropout is None:
            if need_x:
                gd = _gemm_dtype(grad_y)
                dx = _plus_low_rank(_as(grad_y, gd) @ _scaled_rows(w, col, gd), dp, lora_a,
                                    grad_y.dtype)                # (c ⊙ G)·W + dP·A
            if need_a:
                da = dp.T @ _as(x, adapter_dtype)
        else:
            # dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A): the dropped term in acc, masked and
            # added to dx chunk by chunk by the pass that also gives dA's x̃
            add_low = None
            if need_x and _sparse_dropout(grad_y, dropout):
                dx = _dora_dx_sparse(grad_y, w, dp, lora_a, dropout, c)
            elif need_x:
                low = _as(grad_y, acc) @ _scaled_rows(w, col - 1.0, acc)
                if dp.dtype == acc:
                    low.addmm_(dp, _as(lora_a, acc))
                else:
                    low += _as(dp @ lora_a, acc)
                gd = _gemm_dtype(grad_y)
                dx = _as(_as(grad_y, gd) @ _as(w, gd), grad_y.dtype)

                def add_low(rows, mask):
                    torch.addcmul(dx[rows], low[rows], mask, out=dx[rows])

            if need_a:
                da = dp.T @ _dropped(x, dropout, adapter_dtype, add_low)
            elif add_low is not None:
                for rows, mask in _dropout_chunks(low, dropout):
                    add_low(rows, mask)
    dbias = grad_y.sum(0) if need_bias else None
    dm = None
    if need_m:
        dm = _column_dot(grad_y, z, acc)
        dm = dm / (c * norm) if z_is_output else dm / norm
    return dx, da, db, dr, dbias, dm
