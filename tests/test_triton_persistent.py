"""The persistent TMA GEMMs (triton_kernels/persistent.py) against the reference, and the
fallback to the tiled kernels where TMA cannot describe an operand (interpreter or GPU)."""
import contextvars

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

import triton  # noqa: E402
from helpers import make_case  # noqa: E402
from lowrank_fused.triton_kernels import backward, dropout_keep_mask, forward  # noqa: E402
from lowrank_fused.triton_kernels import persistent, variants  # noqa: E402
from test_triton import check  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TMA = int(variants.tma_supported(torch.device(DEVICE)))  # 0 on a pre-Hopper GPU: tiled only
# Rows of x / dx and columns of y 16-byte aligned (TMA) for every dtype, yet no multiple of the
# interpreter's 32-wide blocks; M odd. 2 x 3 output tiles over 3 programs on the interpreter.
LEAD, K, N = (3, 13), 72, 88


@pytest.fixture
def launches(monkeypatch):
    """Counts the persistent launches of each GEMM; forces the TMA variant."""
    counts = {"fused_linear": 0, "grad_input": 0}
    for name in counts:
        def spy(*args, _name=name, _launch=getattr(persistent, name)):
            counts[_name] += 1
            return _launch(*args)
        monkeypatch.setattr(persistent, name, spy)
    monkeypatch.setenv(variants.ENV, "tma")
    return counts


# Each dtype, rank and bias setting at least twice, not the whole product (the interpreter is
# slow); adapters in fp32 over half bases as PEFT keeps them, in the base dtype once.
CASES = [(torch.float32, 1, True), (torch.float32, 25, False), (torch.bfloat16, 12, True),
         (torch.bfloat16, 64, False), (torch.float16, 25, True), (torch.float16, 64, True),
         (torch.float16, 1, False), (torch.bfloat16, 12, False)]


@pytest.mark.parametrize("dtype,rank,bias", CASES,
                         ids=[f"{str(d)[6:]}-r{r}-{'bias' if b else 'no_bias'}"
                              for d, r, b in CASES])
def test_persistent_kernels_match_reference(launches, dtype, rank, bias):
    adapter_dtype = dtype if rank == 12 else torch.float32
    case = make_case(LEAD, K, N, rank, trainable={"lora_a", "lora_b"}, bias=bias, dtype=dtype,
                     adapter_dtype=adapter_dtype, device=DEVICE, seed=rank)
    check(case, dtype)  # y, dx, dA, dB through the backend, x flattened from 3-D
    assert launches == {"fused_linear": TMA, "grad_input": TMA}
    if DEVICE == "cpu":  # several tiles per program: the persistent loop is walked
        m = LEAD[0] * LEAD[1]
        assert triton.cdiv(m, 32) * triton.cdiv(N, 32) > persistent.INTERPRETER_PROGRAMS


def test_lora_xs_with_bias_gradient(launches):
    # B_eff = B·Rᵀ is a strided product, read by plain loads in the K-extension.
    case = make_case(LEAD, K, N, 12, trainable={"latent", "bias"}, latent=True,
                     dtype=torch.bfloat16, adapter_dtype=torch.float32, device=DEVICE)
    check(case, torch.bfloat16)
    assert launches == {"fused_linear": TMA, "grad_input": TMA}


def _operands(m=37, k=K, n=N, r=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    t = {"x": torch.randn(m, k, generator=g), "weight": torch.randn(n, k, generator=g) / 8,
         "bias": torch.randn(n, generator=g), "p": torch.randn(m, r, generator=g),
         "lora_b_eff": torch.randn(n, r, generator=g) / 4, "grad_y": torch.randn(m, n, generator=g),
         "dp": torch.randn(m, r, generator=g), "lora_a": torch.randn(r, k, generator=g) / 8}
    return {name: v.to(dtype if name in ("x", "weight", "bias", "grad_y") else torch.float32)
            .to(DEVICE) for name, v in t.items()}


def _check_forward(t, name):
    y = forward.fused_linear(t["x"], t["weight"], t["bias"], t["p"], t["lora_b_eff"], 0.5)

    def want(c):
        return c(t["x"]) @ c(t["weight"]).T + c(t["bias"]) + 0.5 * c(t["p"]) @ c(t["lora_b_eff"]).T
    assert_kernel_close(y, want(torch.Tensor.double), want(torch.Tensor.float).to(y.dtype), name)


def _check_grad_input(t, name, p_drop=0.0):
    dx = backward.grad_input(t["grad_y"], t["weight"], t["dp"], t["lora_a"], 5, p_drop)
    keep = 1.0
    if p_drop:
        keep = dropout_keep_mask(5, p_drop, dx.shape, DEVICE).double() / (1 - p_drop)

    def want(c):
        return c(t["grad_y"]) @ c(t["weight"]) + (c(t["dp"]) @ c(t["lora_a"])) * keep
    assert_kernel_close(dx, want(torch.Tensor.double), want(torch.Tensor.float).to(dx.dtype),
                        name)


def _misaligned(v):
    """The same values at a base pointer 4 bytes past a 16-byte boundary."""
    flat = torch.zeros(v.numel() + 1, dtype=v.dtype, device=v.device)
    out = flat[1:].view(v.shape)
    out.copy_(v)
    return out


def _row_padded(v):
    """The same values with one element of padding per row: the row stride is odd."""
    wide = torch.zeros(v.shape[0], v.shape[1] + 1, dtype=v.dtype, device=v.device)
    wide[:, :v.shape[1]] = v
    return wide[:, :v.shape[1]]


def _column_major(v):
    return v.T.contiguous().T


@pytest.mark.parametrize("operand", ["x", "weight"])
@pytest.mark.parametrize("layout", [_misaligned, _row_padded, _column_major],
                         ids=["misaligned", "odd_row_stride", "column_major"])
def test_forward_falls_back_where_tma_cannot_describe(launches, operand, layout):
    t = _operands()
    t[operand] = layout(t[operand])
    assert not persistent.describable(t[operand])
    _check_forward(t, f"y with a {layout.__name__} {operand}")
    assert launches["fused_linear"] == 0


@pytest.mark.parametrize("operand", ["grad_y", "weight"])
@pytest.mark.parametrize("layout", [_misaligned, _row_padded, _column_major],
                         ids=["misaligned", "odd_row_stride", "column_major"])
def test_grad_input_falls_back_where_tma_cannot_describe(launches, operand, layout):
    t = _operands()
    t[operand] = layout(t[operand])
    _check_grad_input(t, f"dx with a {layout.__name__} {operand}")
    assert launches["grad_input"] == 0


def test_unaligned_output_rows_and_dropout_fall_back(launches):
    # y's rows (N = 87 fp32 values) and dx's (K = 70 bf16 values) are not 16-byte multiples;
    # grad_input with dropout is the tiled kernel's alone.
    _check_forward(_operands(n=87), "y with N = 87")
    _check_grad_input(_operands(k=70, dtype=torch.bfloat16), "dx with K = 70")
    assert launches == {"fused_linear": 0, "grad_input": 0}
    _check_grad_input(_operands(), "dx with dropout", p_drop=0.25)
    assert launches["grad_input"] == 0
    # the persistent kernels take strided low-rank operands: P and B_eff / A by plain loads
    t = _operands()
    t["lora_b_eff"], t["lora_a"] = _row_padded(t["lora_b_eff"]), _column_major(t["lora_a"])
    _check_forward(t, "y with strided B_eff")
    _check_grad_input(t, "dx with a column-major A")
    assert launches == {"fused_linear": TMA, "grad_input": TMA}


def test_tiled_stays_the_default_off_hopper(launches, monkeypatch):
    monkeypatch.delenv(variants.ENV)
    t = _operands()
    _check_forward(t, "y")
    _check_grad_input(t, "dx")
    if DEVICE == "cpu" or not variants.tma_supported(torch.device(DEVICE)):
        assert launches == {"fused_linear": 0, "grad_input": 0}
    monkeypatch.setenv(variants.ENV, "fastest")
    with pytest.raises(ValueError, match="expected one of"):
        _check_forward(t, "y")


def test_describable():
    base = torch.zeros(8, 16, device=DEVICE)
    assert persistent.describable(base, base[:, :8], base[2:])
    assert not persistent.describable(base[:, 1:])  # base pointer 4 bytes off
    assert not persistent.describable(base[:, ::2])  # last stride 2
    assert not persistent.describable(torch.zeros(8, 6, device=DEVICE))  # 24-byte rows
    assert persistent.describable(torch.zeros(8, 8, dtype=torch.bfloat16, device=DEVICE))


def test_allocator_is_set_only_where_none_is():
    from triton.runtime import _allocation

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def fresh():
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        persistent.ensure_allocator()
        assert _allocation._allocator.get() is persistent._torch_scratch

    def kept():
        triton.set_allocator(mine)
        persistent.ensure_allocator()
        assert _allocation._allocator.get() is mine

    contextvars.copy_context().run(fresh)  # a copy: the test leaves the caller's context alone
    contextvars.copy_context().run(kept)
