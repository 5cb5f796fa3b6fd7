"""Triton backend against the spec in float64, under the tolerance rule (on CPU under
TRITON_INTERPRET=1, or on CUDA)."""
import dataclasses

import pytest
import torch

import pairwise

pytest.importorskip("triton", reason="the triton package is not installed")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from helpers import case_spec_magnitudes, case_spec_results, grad_output, make_case  # noqa: E402
from lowrank_fused import low_rank_linear, spec  # noqa: E402
from lowrank_fused.backends import pytorch as reference  # noqa: E402
from lowrank_fused.backends import triton as triton_backend  # noqa: E402
from lowrank_fused.triton_kernels import dropout_keep_mask  # noqa: E402
from lowrank_fused.triton_kernels.tiling import offsets_2d  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METHOD_TRAINABLE = {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"}, "lora_xs": {"latent"}}
K, N = 100, 80  # not multiples of any block size


def run(case, backend, p=0.0, seed=11, grad_dtype=None):
    """y and the gradients of the trainable tensors, for one backend; grad_y's values are
    rounded to ``grad_dtype`` (default y's dtype)."""
    names = [n for n, t in case.tensors().items() if t.requires_grad]
    y = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                        latent=case.latent, scaling=case.scaling, dropout_p=p,
                        dropout_seed=seed, backend=backend)
    grad_y = grad_output(y.shape, grad_dtype or y.dtype).to(y)
    grads = torch.autograd.grad(y, [case.tensors()[n] for n in names], grad_y)
    return dict(y=y, **dict(zip(names, grads)))


def run_both(case, p=0.0, seed=11):
    return run(case, "reference", p, seed), run(case, "triton", p, seed)


def with_adapters_in(case, dtype):
    """The same case with the adapters' values rounded to ``dtype`` (same trainable flags)."""
    def cast(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
    return dataclasses.replace(case, lora_a=cast(case.lora_a), lora_b=cast(case.lora_b),
                               latent=cast(case.latent))


def check(case, dtype, p=0.0):
    """Triton against the spec in float64, within the tolerance rule (tests/tolerance.py); the
    spec takes the mask of the project's definition, which is the kernels' mask bit for bit.
    Over a 16-bit base the kernels' low-rank dots take 16-bit operands (as PEFT's autocast
    does), so PyTorch's low-precision run of the same math is the reference with the adapters in
    the base dtype."""
    reference_low, got = run_both(case, p)
    same_math = case if dtype == torch.float32 else with_adapters_in(case, dtype)
    grad_dtype = reference_low["y"].dtype
    torch_low = run(same_math, "reference", p, grad_dtype=grad_dtype)
    grad_y = grad_output(got["y"].shape, grad_dtype)
    want64 = case_spec_results(case, grad_y, p, seed=11)
    terms = case_spec_magnitudes(case, grad_y, p, seed=11)
    assert set(got) == set(want64)
    for name in want64:
        assert got[name].dtype == reference_low[name].dtype, name
        assert_kernel_close(got[name], want64[name], torch_low[name], name, dtype, terms[name])


# Every pair of levels at least once (the full product under LOWRANK_FUSED_EXHAUSTIVE=1, as a
# GPU session's test stage runs it): tests/pairwise.py.
MATCH_CASES = pairwise.cases(dict(
    m=[1, 37, 128], rank=[1, 12, 25, 64], method=sorted(METHOD_TRAINABLE), bias=[True, False],
    p=[0.0, 0.2], dtype=[torch.float32, torch.bfloat16, torch.float16]))


DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _case_id(m, rank, method, bias, p, dtype):
    return (f"{m}-{rank}-{method}-{'bias' if bias else 'no_bias'}-"
            f"{'dropout' if p else 'no_dropout'}-{DTYPE_IDS[dtype]}")


@pytest.mark.parametrize("m,rank,method,bias,p,dtype", MATCH_CASES,
                         ids=[_case_id(*c) for c in MATCH_CASES])
def test_matches_reference(m, rank, method, bias, p, dtype):
    # Adapters in fp32 over a half-precision base, as PEFT keeps them.
    case = make_case((m,), K, N, rank, trainable=METHOD_TRAINABLE[method], bias=bias,
                     latent=method == "lora_xs", dtype=dtype, adapter_dtype=torch.float32,
                     device=DEVICE, seed=m + rank)
    check(case, dtype, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", sorted(METHOD_TRAINABLE))
def test_half_adapters_on_half_base(method, dtype):
    case = make_case((37,), K, N, 25, trainable=METHOD_TRAINABLE[method] | {"bias"},
                     latent=method == "lora_xs", dtype=dtype, device=DEVICE)
    check(case, dtype, 0.1)


def test_three_d_and_non_contiguous_x():
    case = make_case((3, 13), K, N, 12, trainable={"lora_a", "lora_b", "latent"}, latent=True,
                     dtype=torch.float32, device=DEVICE)
    check(case, torch.float32, 0.2)
    # a transposed view: x's rows are strided
    case.x = case.x.detach().reshape(-1, K).T.contiguous().T.requires_grad_()
    assert not case.x.is_contiguous()
    check(case, torch.float32, 0.2)


def test_deterministic_reductions_match():
    case = make_case((128,), K, N, 12, trainable={"lora_b", "bias"}, dtype=torch.float32,
                     device=DEVICE)
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS only warns on GPU
    try:
        check(case, torch.float32)
        first = run_both(case)[1]
        second = run_both(case)[1]
        for name in first:
            assert torch.equal(first[name], second[name]), name
    finally:
        torch.use_deterministic_algorithms(False)


def test_empty_batch():
    case = make_case((0,), K, N, 4, trainable={"lora_a", "lora_b", "bias"},
                     dtype=torch.float32, device=DEVICE)
    want, got = run_both(case, 0.1)
    for name in want:
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name])


def test_kernel_mask_drops_the_asked_share_and_depends_on_seed():
    keep = dropout_keep_mask(5, 0.3, (256, 200), DEVICE)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert torch.equal(keep, dropout_keep_mask(5, 0.3, (256, 200), DEVICE))
    assert not torch.equal(keep, dropout_keep_mask(6, 0.3, (256, 200), DEVICE))
    assert not torch.equal(keep[0], keep[1])


def test_float64_is_refused_with_a_pointer_to_reference():
    case = make_case((4,), K, N, 2, device=DEVICE)
    with pytest.raises(TypeError, match="backend 'triton' supports float16, bfloat16 and float32"):
        low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, backend="triton")


def test_large_rank_is_padded():
    # r = 200 pads to a 256-wide rank block
    case = make_case((37,), 230, 210, 200, trainable={"lora_a", "lora_b", "bias"},
                     dtype=torch.bfloat16, adapter_dtype=torch.float32, device=DEVICE)
    check(case, torch.bfloat16, 0.1)


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view: every row and element spaced out."""
    wide = torch.zeros(*(2 * s for s in t.shape), dtype=t.dtype, device=t.device)
    view = wide[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("operand", ["x", "weight", "bias", "lora_a", "lora_b_eff", "grad_y"])
def test_backend_reads_strided_operands(operand):
    # Issue 14 item 1: every caller pointer is addressed through its strides.
    g = torch.Generator().manual_seed(7)
    m, r = 37, 12
    args = dict(x=torch.randn(m, K, generator=g), weight=torch.randn(N, K, generator=g) / 10,
                bias=torch.randn(N, generator=g), lora_a=torch.randn(r, K, generator=g) / 10,
                lora_b_eff=torch.randn(N, r, generator=g) / 4,
                grad_y=torch.randn(m, N, generator=g))
    args = {name: t.to(DEVICE) for name, t in args.items()}
    strided = dict(args, **{operand: strided_copy(args[operand])})
    results = {}
    for name, backend, given in (("torch_low", reference, args), ("got", triton_backend, strided)):
        y, p = backend.forward(given["x"], given["weight"], given["bias"], given["lora_a"],
                               given["lora_b_eff"], 0.5, None)
        grads = backend.backward(given["grad_y"], given["x"], p, given["weight"],
                                 given["lora_a"], given["lora_b_eff"], 0.5, None, need_x=True,
                                 need_a=True, need_b=True, need_bias=True)
        dx, da, db, _, dbias = grads  # no latent: dR is None
        results[name] = (y, dx, da, db, dbias)
    as64 = {name: t.double() for name, t in args.items()}
    operands = (as64["x"], as64["weight"], as64["lora_a"], as64["lora_b_eff"])
    y64, _ = spec.forward(*operands, bias=as64["bias"], scaling=0.5)
    grads64 = spec.backward(as64["grad_y"], *operands, bias=as64["bias"], scaling=0.5)
    results["want64"] = (y64, grads64.dx, grads64.da, grads64.db, grads64.dbias)
    for label, got, want64, torch_low in zip(["y", "dx", "dA", "dB", "dbias"], results["got"],
                                             results["want64"], results["torch_low"]):
        assert_kernel_close(got, want64, torch_low, f"{label} with a strided {operand}")


@triton.jit
def offsets_kernel(out_ptr, first_row, stride_rows, stride_cols):
    rows = first_row + tl.arange(0, 2)
    cols = tl.arange(0, 2)
    offsets = offsets_2d(rows, cols, stride_rows, stride_cols)
    tl.store(out_ptr + tl.arange(0, 2)[:, None] * 2 + tl.arange(0, 2)[None, :], offsets)


def test_tile_offsets_are_64_bit():
    # Issue 16 item 8: row·stride passes 2^31 on large inputs; checked on the offsets themselves,
    # since a tensor that large does not fit a test (and a huge-stride view over a small storage
    # would make the kernels read outside it).
    out = torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)
    first_row, stride_rows, stride_cols = 70_000, 40_000, 3  # rows·stride ≈ 2.8e9 > 2^31
    offsets_kernel[(1,)](out, first_row, stride_rows, stride_cols)
    rows = torch.arange(first_row, first_row + 2, dtype=torch.int64)[:, None]
    cols = torch.arange(2, dtype=torch.int64)[None, :]
    assert torch.equal(out.cpu(), rows * stride_rows + cols * stride_cols)


def test_low_rank_dots_run_in_the_bases_16_bit_dtype():
    # Issue 16 item 2: fp32 adapters over a half base are rounded at load (16-bit tensor cores);
    # over an fp32 base the dots keep the adapters' dtype, TF32 only where torch allows it.
    from lowrank_fused.triton_kernels.precision import dot_precision, low_rank_dot_dtype
    assert low_rank_dot_dtype(torch.bfloat16, torch.float32) == tl.bfloat16
    assert low_rank_dot_dtype(torch.float16, torch.float32) == tl.float16
    assert low_rank_dot_dtype(torch.float32, torch.float32) == tl.float32
    assert low_rank_dot_dtype(torch.float32, torch.bfloat16) == tl.bfloat16
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(tl.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(tl.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_grad_a_split_over_rows_matches(p):
    # Issue 16 item 3: dA is reduced over M in several splits (here 3 of 128 rows on CPU); the
    # partials must add up to dPᵀ·dropout(x) exactly once per row, the ragged last split
    # included.
    from lowrank_fused.triton_kernels import grad_a
    from lowrank_fused.triton_kernels.backward import _row_splits
    m, r = 300, 12
    assert _row_splits(m, K, torch.device(DEVICE))[0] > 1 or DEVICE == "cuda"
    g = torch.Generator().manual_seed(5)
    dp = torch.randn(m, r, generator=g).to(DEVICE)
    x = torch.randn(m, K, generator=g).to(DEVICE)
    keep = dropout_keep_mask(9, p, (m, K), DEVICE).float() / (1.0 - p)
    want64 = dp.double().T @ (x.double() * keep.double())
    got = grad_a(dp, x, torch.float32, seed=9, p_drop=p)
    assert_kernel_close(got, want64, dp.T @ (x * keep), "dA")


def test_configs_over_the_shared_memory_limit_are_pruned(monkeypatch):
    # Issue 16: configs are pruned before the autotuner compiles them.
    from lowrank_fused.triton_kernels import autotuner, configs, fit
    hopper_gemm = configs.GEMM_CONFIGS["sm90"][0]  # 128x256x64, 3 stages
    # the AOT compile of the bf16 GEMM at this config reports 147456 bytes
    assert fit.shared_memory_estimate(hopper_gemm, "gemm", 2, 16) == 147456
    x = torch.empty(4, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    prune = autotuner._pruner("gemm")
    assert prune(configs.GEMM_CONFIGS["sm90"], {"x_ptr": x}) == configs.GEMM_CONFIGS["sm90"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    kept = prune(configs.GEMM_CONFIGS["sm90"], {"x_ptr": x})  # 99 KB: Hopper's big tiles go
    assert hopper_gemm not in kept and kept
    assert all(fit.shared_memory_estimate(c, "gemm", 2, 16) <= 99 * 1024 for c in kept)
    skinny = autotuner._pruner("skinny")(configs.SKINNY_CONFIGS["sm80"], {"g_ptr": x},
                                       RANK_BLOCK=256)
    assert len(skinny) >= 1  # never empty: the smallest config stays


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: x and dx are 4 GiB each")
def test_inputs_past_2_31_elements():
    # Issue 16 item 8 on real memory: x and dx have more than 2^31 elements, so row·K of the
    # last rows passes int32; a few rows are checked against the reference on those rows alone.
    m, k, n, r = 2 ** 17 + 256, 2 ** 14, 256, 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(n, k, generator=g, device=DEVICE, dtype=torch.bfloat16) * k ** -0.5
    lora_a = torch.randn(r, k, generator=g, device=DEVICE) * k ** -0.5
    lora_b = torch.randn(n, r, generator=g, device=DEVICE).requires_grad_()
    y = low_rank_linear(x, weight, lora_a, lora_b, scaling=0.5, backend="triton")
    grad_y = torch.randn(m, n, generator=g, device=DEVICE, dtype=torch.bfloat16)
    (dx,) = torch.autograd.grad(y, [x], grad_y)
    rows = torch.tensor([0, m // 2, m - 257, m - 1], device=DEVICE)
    xs = x.detach()[rows].requires_grad_()
    ys = low_rank_linear(xs, weight, lora_a, lora_b.detach(), scaling=0.5, backend="reference")
    (dxs,) = torch.autograd.grad(ys, [xs], grad_y[rows])
    torch_low = (ys, dxs)
    operands = [t.double() for t in (x.detach()[rows], weight, lora_a, lora_b.detach())]
    y64, _ = spec.forward(*operands, scaling=0.5)
    want64 = (y64, spec.backward(grad_y[rows].double(), *operands, scaling=0.5).dx)
    for name, got, want, low in zip(("y", "dx"), (y[rows], dx[rows]), want64, torch_low):
        assert_kernel_close(got, want, low, f"{name} rows past 2^31 elements")
