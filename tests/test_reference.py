"""The reference backend equals a naive autograd composition of plain torch ops (float64)."""
import pytest
import torch

from helpers import TRAINABLE, grads_of, make_case, naive_forward, reference_keep_mask
from lowrank_fused import low_rank_linear
from lowrank_fused.backends import pytorch as reference


def run_operator(case, p=0.0, seed=None, backend="reference"):
    return low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                           latent=case.latent, scaling=case.scaling, dropout_p=p,
                           dropout_seed=seed, backend=backend)


@pytest.mark.parametrize("trainable", sorted(TRAINABLE))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_shape", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_forward_and_gradients_equal_naive(trainable, bias, m_shape, p):
    latent = "latent" in trainable or trainable == "lora_xs"
    case = make_case(m_shape, 11, 9, 4, trainable=TRAINABLE[trainable], bias=bias, latent=latent)
    seed = 1234
    y = run_operator(case, p, seed)
    mask = reference_keep_mask(p, seed, (case.x[..., 0].numel(), 11)).reshape(case.x.shape) if p else None
    y_naive = naive_forward(case, mask, p)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)

    grad_y = torch.randn_like(y)
    got = grads_of(y, grad_y, case.tensors())
    want = grads_of(y_naive, grad_y, case.tensors())
    assert set(got) == set(want) and "x" in got
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].dtype == case.tensors()[name].dtype
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_dropout_off_in_eval_and_mask_changes_with_seed():
    case = make_case((16,), 32, 8, 4, x_grad=False)
    y_eval = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                             scaling=case.scaling, dropout_p=0.5, training=False)
    torch.testing.assert_close(y_eval, naive_forward(case), rtol=1e-12, atol=1e-12)
    y1, y2 = (run_operator(case, 0.5, s) for s in (1, 2))
    assert not torch.allclose(y1, y2)
    torch.manual_seed(7)
    y3 = run_operator(case, 0.5)
    torch.manual_seed(7)
    torch.testing.assert_close(run_operator(case, 0.5), y3, rtol=0, atol=0)


@pytest.mark.parametrize("trainable", ["lora", "lora_fa+latent", "everything"])
def test_gradcheck(trainable):
    case = make_case((2, 3), 5, 4, 2, trainable=TRAINABLE[trainable],
                     latent="latent" in trainable or trainable == "everything")
    names = list(case.tensors())

    def fn(*tensors):
        t = dict(zip(names, tensors))
        return low_rank_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t.get("bias"),
                               latent=t.get("latent"), scaling=0.7, dropout_p=0.25,
                               dropout_seed=3, backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(case.tensors().values()))


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_half_base_with_adapters_of_another_dtype(adapter_dtype):
    case = make_case((6,), 16, 8, 4, dtype=torch.bfloat16, adapter_dtype=adapter_dtype,
                     trainable=TRAINABLE["lora"])
    y = run_operator(case)
    assert y.dtype == torch.bfloat16
    grads = grads_of(y, torch.ones_like(y), case.tensors())
    assert grads["x"].dtype == torch.bfloat16
    assert grads["lora_a"].dtype == grads["lora_b"].dtype == adapter_dtype
    case64 = make_case((6,), 16, 8, 4, trainable=TRAINABLE["lora"])
    torch.testing.assert_close(y.double(), naive_forward(case64), rtol=0.05, atol=0.05)


def test_empty_batch():
    case = make_case((0,), 8, 6, 2, trainable=TRAINABLE["lora"])
    y = run_operator(case, 0.2, 1)
    assert y.shape == (0, 6)
    grads = grads_of(y, torch.ones_like(y), case.tensors())
    assert grads["x"].shape == (0, 8)
    assert torch.count_nonzero(grads["lora_a"]) == 0 and torch.count_nonzero(grads["lora_b"]) == 0


def test_non_contiguous_x():
    case = make_case((8,), 12, 5, 3, trainable=TRAINABLE["lora"])
    x_t = case.x.detach().T.contiguous().T.requires_grad_()  # same values, column-major
    assert not x_t.is_contiguous()
    y = low_rank_linear(x_t, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                        scaling=case.scaling, backend="reference")
    torch.testing.assert_close(y, naive_forward(case), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trainable", ["lora", "lora_fa", "lora_xs"])
def test_dropout_gradients_without_x_grad(trainable):
    """Backward makes the mask once for dx's term and dA; with x not needing a gradient only
    dA's dropout(x) (or nothing) is formed: the same gradients as the naive composition."""
    latent = trainable == "lora_xs"
    case = make_case((40,), 70, 9, 4, trainable=TRAINABLE[trainable], latent=latent,
                     x_grad=False)
    seed, p = 2 ** 33 + 1, 0.3
    y = run_operator(case, p, seed)
    mask = reference_keep_mask(p, seed, (40, 70))
    y_naive = naive_forward(case, mask, p)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn_like(y)
    got, want = grads_of(y, grad_y, case.tensors()), grads_of(y_naive, grad_y, case.tensors())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_dropout_over_a_16_bit_base_is_applied_in_the_adapters_dtype():
    """bf16 x with fp32 adapters: dropout(x) is formed in fp32 (as PEFT casts x to lora_A's
    dtype first), so P and dA carry fp32 rounding only, not a bf16 rounding of x / (1 - p)."""
    case = make_case((64,), 96, 24, 8, dtype=torch.bfloat16, adapter_dtype=torch.float32,
                     trainable=TRAINABLE["lora"], x_grad=False)
    seed, p = 77, 0.1
    y = run_operator(case, p, seed)
    keep = reference_keep_mask(p, seed, (64, 96)).double()
    from lowrank_fused.dropout import DropoutSpec
    dropped = case.x.detach().double() * keep * DropoutSpec(p, seed).keep_scale
    p64 = dropped @ case.lora_a.detach().double().T
    _, p32 = reference.forward(case.x.detach(), case.weight, case.bias, case.lora_a.detach(),
                               case.lora_b.detach(), case.scaling, DropoutSpec(p, seed))
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, rtol=1e-5, atol=1e-5 * p64.abs().max().item())
    grad_y = torch.randn_like(y)
    da = grads_of(y, grad_y, case.tensors())["lora_a"]
    dp64 = case.scaling * grad_y.double() @ case.lora_b.detach().double()
    da64 = dp64.T @ dropped
    torch.testing.assert_close(da.double(), da64, rtol=1e-5, atol=1e-5 * da64.abs().max().item())
