"""Triton backend: the backend contract (see ``pytorch``) on the kernels of
``lowrank_fused.triton_kernels``. Every call runs with the tensors' device current
(``device_guard``): Triton launches on the current device and its stream.

A 4-bit ``weight`` (a ``quantized.Packed4bit``: bitsandbytes' NF4 / FP4 format) goes to the
4-bit GEMMs (``triton_kernels/quantized.py``), which dequantize W tile by tile inside their K
loops: forward's x·Wᵀ and backward's G·W. The rest of the backward (the pass over G, dA) never
touches W and is the same."""
from __future__ import annotations

import torch

from .. import triton_kernels as kernels
from ..quantized import Packed4bit
from ..triton_kernels import autotuner as kernels_autotuner, quantized as kernels_4bit, variants
from ..tuning import autotune as persisted
from ._gpu_common import check_dtypes, device_guard, seed_and_p
from .pytorch import latent_gradients, latent_operands

NAME = "triton"

# The kernels' launch configs and GEMM variants, chosen once per key and remembered across
# processes (the tuning cache, the shipped table): the kernels expose the hooks, this package
# fills them (the kernels never import it).
kernels_autotuner.choice_hook = persisted.restore_or_tune
variants.variant_hook = persisted.remembered_variant


def dropout_keep_mask(dropout, shape, device):
    with device_guard(device):
        return kernels.dropout_keep_mask(dropout.seed, dropout.quantised_p, shape, device)


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    check_dtypes("triton", x, lora_a)
    seed, p_drop = seed_and_p(dropout)
    with device_guard(x.device):
        p = kernels.project(x, lora_a, seed, p_drop)
        if isinstance(weight, Packed4bit):  # W dequantized inside the K loop, never dense
            y = kernels_4bit.fused_linear_4bit(x, weight, bias, p, lora_b_eff, scaling)
        else:
            y = kernels.fused_linear(x, weight, bias, p, lora_b_eff, scaling)  # strides honoured
    return y, p


def backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    grad_y = grad_y.contiguous()  # the kernels index G by rows
    with device_guard(grad_y.device):
        return _backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, latent,
                         need_x, need_a, need_b, need_latent and latent is not None, need_bias)


def _backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, latent, need_x, need_a,
              need_b, need_latent, need_bias):
    seed, p_drop = seed_and_p(dropout)
    four_bit = isinstance(weight, Packed4bit)  # bias then has the compute dtype, G's
    need_dp = need_x or need_a
    dp, db, dbias = kernels.grad_output_pass(
        grad_y, lora_b, latent_operands(p, latent, need_b), scaling,
        need_dp=need_dp or need_latent, need_db=need_b, need_dbias=need_bias,
        bias_dtype=grad_y.dtype if four_bit else weight.dtype, deterministic=torch.are_deterministic_algorithms_enabled())
    dr = None
    if latent is not None:
        dp, dr = latent_gradients(dp, p, latent, need_dp, need_latent)
    dx = None
    if need_x and four_bit:
        dx = kernels_4bit.grad_input_4bit(grad_y, weight, dp, lora_a, seed, p_drop)
    elif need_x:
        dx = kernels.grad_input(grad_y, weight, dp, lora_a, seed, p_drop)
    da = kernels.grad_a(dp, x, lora_a.dtype, seed, p_drop) if need_a else None
    return dx, da, db, dr, dbias


# DoRA (lowrank_fused.dora; the PyTorch backend's dora_forward / dora_backward contract): the
# column scale c fused into the kernels (triton_kernels/dora.py). A 4-bit weight never comes here
# (dispatch.select keeps QDoRA on the PyTorch backend).

def dora_forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *, need_z):
    """(y, p, z) as the reference's: P by the plain operator's pass (with dropout, writing x̃
    as it goes), then y (and Z when ``need_z``) from one GEMM with c in its epilogue."""
    check_dtypes("triton", x, lora_a)
    seed, p_drop = seed_and_p(dropout)
    with device_guard(x.device):
        if dropout is None:
            p, x_dropped = kernels.project(x, lora_a), None
        else:  # x̃ from the same pass (a transient of this call, never saved)
            p, x_dropped = kernels.project_dropped(x, lora_a, seed, p_drop)
        y, z = kernels.dora_linear(x, weight, bias, p, lora_b_eff, scaling, _column_scale(c),
                                   x_dropped, need_z)
    return y, p, z


def dora_backward(grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling, dropout, c, norm, *,
                  need_x, need_a, need_b, need_latent, need_bias, need_m, z_is_output=False):
    """(dx, dA, dB, dR, dbias, dm) as the reference's: one pass over G (c applied on load) for
    dP, dB, dbias and Σ_rows G ⊙ Z; dx by one GEMM over G; dA as the plain operator's.
    ``z_is_output``: ``z`` is the output y, so Z = y / c (dm divides the N-vector by c)."""
    grad_y = grad_y.contiguous()  # the kernels index G by rows
    with device_guard(grad_y.device):
        seed, p_drop = seed_and_p(dropout)
        scale = _column_scale(c)
        need_latent = need_latent and latent is not None
        need_dp = need_x or need_a
        dp, db, dbias, gz = kernels.dora_grad_output_pass(
            grad_y, z, scale, lora_b, latent_operands(p, latent, need_b), scaling,
            need_dp=need_dp or need_latent, need_db=need_b, need_dbias=need_bias,
            need_gz=need_m, bias_dtype=weight.dtype,
            deterministic=torch.are_deterministic_algorithms_enabled())
        dr = None
        if latent is not None:
            dp, dr = latent_gradients(dp, p, latent, need_dp, need_latent)
        dx = (kernels.dora_grad_input(grad_y, weight, scale, dp, lora_a, seed, p_drop)
              if need_x else None)
        da = kernels.grad_a(dp, x, lora_a.dtype, seed, p_drop) if need_a else None
        dm = None
        if need_m:
            dm = gz / (c * norm) if z_is_output else gz / norm
    return dx, da, db, dr, dbias, dm


def _column_scale(c):
    """c as the kernels read it: fp32, contiguous (it is an fp32 N-vector already)."""
    return c.to(torch.float32).contiguous()


def config_key():
    """What, besides the call's shapes and dtypes, decides which kernel code runs: the requested
    GEMM variant (LOWRANK_FUSED_TRITON_GEMM), part of the first-use check's key."""
    return variants.requested()


_GEMMS = {"forward": "fused_linear", "backward": "grad_input", "DoRA forward": "dora_linear",
          "DoRA backward": "dora_grad_input"}


def describe_config(direction: str, device, shape) -> str:
    """The autotuners' chosen configs for ``direction``'s kernels (their last launch: this
    call's) and the GEMM variant's timed winner for ``shape`` (M bucket, N, K, r): what a
    failed first-use check names."""
    parts = [f"GEMM variant {variants.requested()}"]
    gemm = _GEMMS.get(direction)
    backward = direction.endswith("backward")
    for key, chosen in list(variants._winners.items()):
        name, where, *_, shape_key = key
        if name == gemm and where == device.index and tuple(shape_key[:4]) == tuple(shape):
            parts.append(f"{name} timed winner {chosen}")
    tuned = []
    for tuner in _autotuners():
        kernel = getattr(getattr(tuner, "base_fn", None), "__name__", "?")
        best = getattr(tuner, "best_config", None)
        if best is not None and kernel.startswith("_grad") == backward:
            tuned.append(f"{kernel}: {best}")
    parts.extend(tuned or ["n/a (no autotuned config: interpreter's fixed configs)"])
    return "; ".join(parts)


def _autotuners() -> list:
    """The kernels' autotuners (their table lives in triton_kernels/autotuner.py)."""
    return list(kernels_autotuner._tuned.values())
