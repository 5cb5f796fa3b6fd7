"""The reference backend (the tuned CPU path: row chunks, sparse dropout at small rates, 16-bit
GEMMs upcast where oneDNN lacks them, c folded into W's rows for DoRA) against the spec
(lowrank_fused.spec), through the public API: tightly in float64, under the tolerance rule
(tests/tolerance.py) in fp32, bf16 and fp16."""
import pytest
import torch

import pairwise
from helpers import (TRAINABLE, case_spec_results, grad_output, grads_of, make_case,
                     spec_results)
from lowrank_fused import low_rank_linear, spec
from lowrank_fused.backends import pytorch as reference
from tolerance import assert_kernel_close


def run_operator(case, p=0.0, seed=None, backend="reference"):
    return low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                           latent=case.latent, scaling=case.scaling, dropout_p=p,
                           dropout_seed=seed, backend=backend)


@pytest.mark.parametrize("trainable", sorted(TRAINABLE))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m_shape", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_forward_and_gradients_equal_the_spec(trainable, bias, m_shape, p):
    latent = "latent" in trainable or trainable == "lora_xs"
    case = make_case(m_shape, 11, 9, 4, trainable=TRAINABLE[trainable], bias=bias, latent=latent)
    seed = 1234
    y = run_operator(case, p, seed)
    grad_y = torch.randn_like(y)
    want = case_spec_results(case, grad_y, p, seed)
    torch.testing.assert_close(y, want.pop("y"), rtol=1e-12, atol=1e-12)

    got = grads_of(y, grad_y, case.tensors())
    assert set(got) == set(want) and "x" in got
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].dtype == case.tensors()[name].dtype
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_dropout_off_in_eval_and_mask_changes_with_seed():
    case = make_case((16,), 32, 8, 4, x_grad=False)
    y_eval = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                             scaling=case.scaling, dropout_p=0.5, training=False)
    torch.testing.assert_close(y_eval, case_spec_results(case)["y"], rtol=1e-12, atol=1e-12)
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
    torch.testing.assert_close(y.double(), case_spec_results(case64)["y"], rtol=0.05, atol=0.05)


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
    torch.testing.assert_close(y, case_spec_results(case)["y"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trainable", ["lora", "lora_fa", "lora_xs"])
def test_dropout_gradients_without_x_grad(trainable):
    """Backward makes the mask once for dx's term and dA; with x not needing a gradient only
    dA's dropout(x) (or nothing) is formed: the same gradients as the spec."""
    latent = trainable == "lora_xs"
    case = make_case((40,), 70, 9, 4, trainable=TRAINABLE[trainable], latent=latent,
                     x_grad=False)
    seed, p = 2 ** 33 + 1, 0.3
    y = run_operator(case, p, seed)
    grad_y = torch.randn_like(y)
    want = case_spec_results(case, grad_y, p, seed)
    torch.testing.assert_close(y, want.pop("y"), rtol=1e-12, atol=1e-12)
    got = grads_of(y, grad_y, case.tensors())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_dropout_over_a_16_bit_base_is_applied_in_the_adapters_dtype():
    """bf16 x with fp32 adapters: dropout(x) is formed in fp32 (as PEFT casts x to lora_A's
    dtype first), so P and dA carry fp32 rounding only, not a bf16 rounding of x / (1 - p)."""
    case = make_case((64,), 96, 24, 8, dtype=torch.bfloat16, adapter_dtype=torch.float32,
                     trainable=TRAINABLE["lora"], x_grad=False)
    seed, p = 77, 0.1
    y = run_operator(case, p, seed)
    from lowrank_fused.dropout import DropoutSpec
    operands = [t.detach().double() for t in (case.x, case.weight, case.lora_a, case.lora_b)]
    _, p64 = spec.forward(*operands, bias=case.bias.detach().double(), scaling=case.scaling,
                          keep=spec.keep_mask((64, 96), seed, p), dropout_p=p)
    _, p32 = reference.forward(case.x.detach(), case.weight, case.bias, case.lora_a.detach(),
                               case.lora_b.detach(), case.scaling, DropoutSpec(p, seed))
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, rtol=1e-5, atol=1e-5 * p64.abs().max().item())
    grad_y = torch.randn_like(y)
    da = grads_of(y, grad_y, case.tensors())["lora_a"]
    da64 = case_spec_results(case, grad_y, p, seed)["lora_a"]
    torch.testing.assert_close(da.double(), da64, rtol=1e-5, atol=1e-5 * da64.abs().max().item())


# ---- the tuned paths against the spec: every dtype, DoRA, small and large dropout rates ----

METHOD_TRAINABLE = {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"}, "lora_xs": {"latent"}}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64"}
K_ODD, N_ODD = 70, 50  # K not a multiple of 16
# p = 0.05: the sparse products of DoRA's dropout (at most reference._SPARSE_DROPOUT_MAX_P);
# 0.3: the dense masked passes. Odd M of 5 or more: at M = 1 and r = 1 all of dB is one rounded
# scalar P times G, so both errors of the rule are one rounding each and the 2x ratio is a coin
# toss between two equally good fp16 runs. Every pair of levels at least once (tests/pairwise.py).
SPEC_CASES = pairwise.cases(dict(
    lead=[(37,), (5,), (3, 13)], rank=[1, 12, 25, 64], method=sorted(METHOD_TRAINABLE),
    bias=[True, False], p=[0.0, 0.05, 0.3], dora=[False, True],
    dtype=[torch.float32, torch.bfloat16, torch.float16, torch.float64],
    adapters=["fp32", "base"], strided=[False, True]))


def _spec_case_id(lead, rank, method, bias, p, dora, dtype, adapters, strided):
    return (f"{'x'.join(map(str, lead))}-r{rank}-{method}-{'bias' if bias else 'no_bias'}-p{p}-"
            f"{'dora' if dora else 'plain'}-{DTYPE_IDS[dtype]}-adapters_{adapters}"
            f"{'-strided' if strided else ''}")


def test_sparse_rate_takes_the_sparse_path():
    assert 0.05 <= reference._SPARSE_DROPOUT_MAX_P < 0.3


@pytest.mark.parametrize("lead,rank,method,bias,p,dora,dtype,adapters,strided", SPEC_CASES,
                         ids=[_spec_case_id(*c) for c in SPEC_CASES])
def test_matches_the_spec(lead, rank, method, bias, p, dora, dtype, adapters, strided):
    adapter_dtype = torch.float32 if adapters == "fp32" and dtype != torch.float64 else dtype
    case = make_case(lead, K_ODD, N_ODD, rank, bias=bias, latent=method == "lora_xs",
                     trainable=METHOD_TRAINABLE[method] | ({"bias"} if bias else set()),
                     dtype=dtype, adapter_dtype=adapter_dtype, seed=rank + len(lead))
    tensors = case.tensors()
    if strided:  # x's rows strided (column-major storage), through its 2-D view as well
        tensors["x"] = tensors["x"].detach().transpose(0, -1).contiguous().transpose(0, -1)
        tensors["x"].requires_grad_()
    if dora:  # m around ‖W_n‖ (≈ 1 here), not equal to it: c − 1 is not 0
        g = torch.Generator().manual_seed(rank)
        tensors["magnitude"] = (1.0 + 0.2 * torch.randn(N_ODD, generator=g, dtype=torch.float64)
                                ).to(adapter_dtype).requires_grad_()
    seed = 2 ** 32 + rank
    y = low_rank_linear(tensors["x"], tensors["weight"], tensors["lora_a"], tensors["lora_b"],
                        bias=tensors.get("bias"), latent=tensors.get("latent"),
                        scaling=case.scaling, dropout_p=p, dropout_seed=seed,
                        magnitude=tensors.get("magnitude"), backend="reference")
    grad_y = grad_output(y.shape, dtype)
    names = [name for name, t in tensors.items() if t.requires_grad]
    got = dict(y=y, **dict(zip(names, torch.autograd.grad(y, [tensors[n] for n in names],
                                                          grad_y))))
    want64 = spec_results(tensors, grad_y, scaling=case.scaling, p=p, seed=seed)
    assert set(got) == set(want64) and "x" in got
    if dtype == torch.float64:
        for name in want64:
            torch.testing.assert_close(got[name], want64[name], rtol=1e-12, atol=1e-12, msg=name)
        return
    # PyTorch's low-precision run of the same math: the spec in the base's dtype (the adapters
    # rounded to it, as test_triton.py's kernels multiply them)
    torch_low = spec_results(tensors, grad_y, scaling=case.scaling, p=p, seed=seed, dtype=dtype)
    for name in want64:
        assert got[name].dtype == (tensors[name].dtype if name != "y" else dtype), name
        assert_kernel_close(got[name], want64[name], torch_low[name].to(got[name].dtype), name,
                            dtype)
