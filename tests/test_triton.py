"""Triton backend against the reference backend (on CPU under TRITON_INTERPRET=1, or on CUDA)."""
import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

from helpers import as_float64, make_case  # noqa: E402
from lowrank_fused import low_rank_linear  # noqa: E402
from lowrank_fused.triton_kernels import dropout_keep_mask  # noqa: E402
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
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float32).to(grad_dtype or y.dtype).to(y)
    grads = torch.autograd.grad(y, [case.tensors()[n] for n in names], grad_y)
    return dict(y=y, **dict(zip(names, grads)))


def run_both(case, p=0.0, seed=11):
    return run(case, "reference", p, seed), run(case, "triton", p, seed)


def check(case, dtype, p=0.0):
    """Triton against the float64 reference, within the tolerance rule (tests/tolerance.py);
    the reference draws its own mask, which is the kernels' mask bit for bit."""
    torch_low, got = run_both(case, p)
    want64 = run(as_float64(case), "reference", p, grad_dtype=torch_low["y"].dtype)
    assert set(got) == set(want64)
    for name in want64:
        assert got[name].dtype == torch_low[name].dtype, name
        assert_kernel_close(got[name], want64[name], torch_low[name], name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("method", sorted(METHOD_TRAINABLE))
@pytest.mark.parametrize("rank", [1, 12, 25, 64])
@pytest.mark.parametrize("m", [1, 37, 128])
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
