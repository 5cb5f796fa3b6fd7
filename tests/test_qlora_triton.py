"""QLoRA on the Triton backend (issue 23): the 4-bit GEMMs that dequantize W (bitsandbytes NF4 /
FP4) inside their K loops. The dequantized values are bit-equal to bitsandbytes'
dequantize_4bit; y and every gradient are within the one tolerance rule of a float64 reference
over that dequantized W; routing of 4-bit calls (dispatch.select)."""
import copy
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="the bitsandbytes package is not installed")
pytest.importorskip("triton", reason="the triton package is not installed")

import bitsandbytes.functional as bnb_f  # noqa: E402

import lowrank_fused as lf  # noqa: E402
from helpers import case_spec_magnitudes, case_spec_results, grad_output, make_case  # noqa: E402
from lowrank_fused import dispatch, quantized  # noqa: E402
from lowrank_fused.backends import triton as triton_backend  # noqa: E402
from lowrank_fused.errors import BackendUnavailableError  # noqa: E402
from lowrank_fused.triton_kernels import quantized as kernels_4bit  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton_here = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1")
METHOD_TRAINABLE = {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"}, "lora_xs": {"latent"}}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# N·K = 50·70: blocks of 64 and 128 span rows (K is a multiple of neither), and K = 70 is not a
# multiple of the interpreter's 32-wide K tile either
K, N = 70, 50


def params4bit(weight, quant_type="nf4", blocksize=64, nested=False):
    return bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False,
                             quant_type=quant_type, blocksize=blocksize,
                             compress_statistics=nested).to(DEVICE)  # .to() quantizes


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


# ---- the dequantized values: bit-equal to bitsandbytes' ----

@needs_triton_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantized_values_are_bitsandbytes_bit_for_bit(quant_type, nested, dtype):
    # blocksizes 64/128/256 (and 32, 512 past the common ones) over shapes whose blocks span rows
    for blocksize, (n, k) in ((64, (33, 70)), (128, (24, 200)), (256, (9, 130)),
                              (32, (5, 46)), (512, (40, 62))):
        g = torch.Generator().manual_seed(blocksize)
        weight = params4bit((torch.randn(n, k, generator=g) * 3).to(dtype), quant_type,
                            blocksize, nested)
        want = bnb_f.dequantize_4bit(weight.data, weight.quant_state)
        got = kernels_4bit.dequantize_4bit(quantized.packed(weight))
        assert got.dtype == want.dtype == dtype and got.shape == want.shape == (n, k)
        assert torch.equal(bits(got), bits(want)), (quant_type, blocksize, nested, dtype)
        # and cast to another compute dtype, as the GEMMs load it: bitsandbytes' then .to()
        other = torch.bfloat16 if dtype != torch.bfloat16 else torch.float16
        got = kernels_4bit.dequantize_4bit(quantized.packed(weight), other)
        assert torch.equal(bits(got), bits(want.to(other)))


@needs_triton_here
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_blocks_spanning_rows_of_even_length_follow_bitsandbytes_definition(nested):
    # K even, not a multiple of the blocksize: bitsandbytes 0.50.2's native CPU dequantize
    # takes blocks per row there (about 2 off W at K = 80), its generic definition (and its CUDA
    # kernels) flat blocks; the kernels follow the definition
    generic = pytest.importorskip("bitsandbytes.backends.default.ops")._dequantize_4bit_compute
    for blocksize, (n, k) in ((64, (48, 80)), (128, (48, 64)), (64, (6, 48))):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
        weight = params4bit(w, "nf4", blocksize, nested)
        state = weight.quant_state
        absmax = state.absmax
        if nested:
            absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        want = generic(weight.data.view(torch.uint8).reshape(-1).cpu(), absmax.float().cpu(),
                       state.code.cpu(), blocksize, (n, k), torch.float32)
        got = kernels_4bit.dequantize_4bit(quantized.packed(weight)).cpu()
        assert torch.equal(got, want), (blocksize, n, k)
        assert (got - w).abs().max() < 0.5  # the quantization error, nothing more


@needs_triton_here
def test_packed_bytes_stored_as_another_dtype_read_the_same():
    # quant_storage: bitsandbytes may keep the packed bytes viewed as bf16 (FSDP's choice)
    weight = bnb.nn.Params4bit(torch.randn(16, 64), requires_grad=False, blocksize=64,
                               quant_type="nf4", quant_storage=torch.bfloat16).to(DEVICE)
    assert weight.data.dtype == torch.bfloat16
    got = kernels_4bit.dequantize_4bit(quantized.packed(weight))
    assert torch.equal(got, bnb_f.dequantize_4bit(weight.data, weight.quant_state))


def test_packed_view_names_what_is_missing():
    weight = params4bit(torch.randn(8, 64), nested=True)
    view = quantized.packed(weight)
    assert view.nested and view.shape == (8, 64) and view.blocksize2 == 256
    assert view.data.dtype == torch.uint8 and view.data.numel() == 8 * 64 // 2
    for field, message in (("absmax", "missing absmax"), ("code", "missing code"),
                           ("state2", "state2")):
        broken = copy.copy(weight)
        broken.quant_state = copy.copy(weight.quant_state)
        setattr(broken.quant_state, field, None)
        with pytest.raises(ValueError, match=message):
            quantized.packed(broken)
    broken.quant_state = copy.copy(weight.quant_state)
    broken.quant_state.state2 = copy.copy(weight.quant_state.state2)
    broken.quant_state.state2.code = None
    with pytest.raises(ValueError, match="state2.code"):
        quantized.packed(broken)
    broken.quant_state = copy.copy(weight.quant_state)
    broken.quant_state.absmax = weight.quant_state.absmax[:1]
    with pytest.raises(ValueError, match="fewer than the 8 blocks"):
        quantized.packed(broken)


# ---- the operator: y and every gradient against float64 over the dequantized W ----

def run(case, backend, p, seed=11, grad_dtype=None):
    names = [n for n, t in case.tensors().items() if t.requires_grad]
    y = lf.low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                           latent=case.latent, scaling=case.scaling, dropout_p=p,
                           dropout_seed=seed, backend=backend)
    grad_y = grad_output(y.shape, grad_dtype or y.dtype).to(y)
    grads = torch.autograd.grad(y, [case.tensors()[n] for n in names], grad_y)
    return dict(y=y, **dict(zip(names, grads)))


def with_adapters_in(case, dtype):
    def cast(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
    return dataclasses.replace(case, lora_a=cast(case.lora_a), lora_b=cast(case.lora_b),
                               latent=cast(case.latent))


def check_4bit(case, dtype, p=0.0, quant_type="nf4", blocksize=64, nested=False,
               state_dtype=None):
    """The Triton 4-bit path against the spec in float64 over bitsandbytes' dequantized W
    (want64) and the reference's low-precision run of the same math (torch_low), the tolerance
    rule (tests/tolerance.py) on y and each gradient."""
    weight = params4bit(case.weight.to(state_dtype or dtype), quant_type, blocksize, nested)
    dense = quantized.dequantize(weight, dtype)  # bitsandbytes' values in the compute dtype
    got = run(dataclasses.replace(case, weight=weight), "triton", p)
    dense_case = dataclasses.replace(case, weight=dense)
    reference_low = run(dataclasses.replace(case, weight=weight), "reference", p)
    same_math = dense_case if dtype == torch.float32 else with_adapters_in(dense_case, dtype)
    torch_low = run(same_math, "reference", p, grad_dtype=dtype)
    grad_y = grad_output(got["y"].shape, dtype)
    want64 = case_spec_results(dense_case, grad_y, p, seed=11)
    terms = case_spec_magnitudes(dense_case, grad_y, p, seed=11)
    assert set(got) == set(want64) == set(reference_low)
    for name in want64:
        assert got[name].dtype == reference_low[name].dtype, name
        assert_kernel_close(got[name], want64[name], torch_low[name], name, dtype, terms[name])


# (M rows, K, r, method, bias, dropout, dtype, quant type, blocksize, nested): every method, each
# rank of the issue, odd M, both quant types, nested and not; K = 70 (blocks span rows: the
# kernels' flat-index path) and K = 128 or 256 (whole blocks per row: their aligned path)
CASES = [
    (37, 70, 12, "lora", True, 0.0, torch.bfloat16, "nf4", 64, True),
    (1, 70, 1, "lora_fa", False, 0.0, torch.float32, "fp4", 128, False),
    (37, 70, 25, "lora_xs", True, 0.2, torch.float16, "nf4", 256, False),
    (33, 128, 64, "lora", False, 0.2, torch.float32, "fp4", 64, True),
    (37, 128, 16, "lora_fa", True, 0.2, torch.bfloat16, "fp4", 64, False),
    (5, 256, 12, "lora_xs", False, 0.0, torch.bfloat16, "nf4", 128, True),
    (37, 128, 12, "lora", True, 0.0, torch.float16, "nf4", 128, False),
]


def _id(m, k, r, method, bias, p, dtype, quant_type, blocksize, nested):
    return (f"{m}-{k}-{r}-{method}-{'bias' if bias else 'no_bias'}-"
            f"{'dropout' if p else 'no_dropout'}-{DTYPE_IDS[dtype]}-{quant_type}{blocksize}"
            f"{'-nested' if nested else ''}")


@needs_triton_here
@pytest.mark.parametrize("m,k,r,method,bias,p,dtype,quant_type,blocksize,nested", CASES,
                         ids=[_id(*c) for c in CASES])
def test_4bit_triton_matches_float64_over_the_dequantized_weight(m, k, r, method, bias, p, dtype,
                                                                  quant_type, blocksize, nested):
    # fp32 adapters over the base, as PEFT keeps them; bias trainable where present
    trainable = METHOD_TRAINABLE[method] | ({"bias"} if bias else set())
    case = make_case((m,), k, N, r, trainable=trainable, bias=bias, latent=method == "lora_xs",
                     dtype=dtype, adapter_dtype=torch.float32, device=DEVICE, seed=m + r)
    check_4bit(case, dtype, p, quant_type, blocksize, nested)


@needs_triton_here
def test_4bit_three_d_and_non_contiguous_x_and_a_state_dtype_of_its_own():
    case = make_case((3, 7), K, N, 12, trainable={"lora_a", "lora_b", "bias"},
                     dtype=torch.bfloat16, adapter_dtype=torch.float32, device=DEVICE)
    check_4bit(case, torch.bfloat16, 0.2, nested=True)
    # a transposed view: x's rows are strided; the quant state computes in fp16, x in bf16
    case.x = case.x.detach().reshape(-1, K).T.contiguous().T.requires_grad_()
    assert not case.x.is_contiguous()
    check_4bit(case, torch.bfloat16, 0.0, "fp4", 128, state_dtype=torch.float16)


@needs_triton_here
def test_4bit_triton_never_builds_the_dense_weight(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton 4-bit path dequantized W densely")
    monkeypatch.setattr(quantized, "dequantize", refuse)
    monkeypatch.setattr(bnb_f, "dequantize_4bit", refuse)
    monkeypatch.setenv("LOWRANK_FUSED_VERIFY", "off")
    case = make_case((9,), K, N, 4, trainable={"lora_a", "lora_b"}, dtype=torch.float32,
                     device=DEVICE)
    weight = params4bit(case.weight)
    y = lf.low_rank_linear(case.x, weight, case.lora_a, case.lora_b, bias=case.bias,
                           backend="triton")
    y.sum().backward()
    assert case.x.grad is not None and case.lora_a.grad is not None


@needs_triton_here
def test_verified_first_use_checks_a_4bit_call_against_the_dequantized_weight(monkeypatch):
    import warnings
    from lowrank_fused import verification
    monkeypatch.setenv("LOWRANK_FUSED_VERIFY", "on")
    monkeypatch.setattr(verification, "_verdicts", {})
    case = make_case((11,), 128, N, 8, trainable={"lora_a", "lora_b"}, dtype=torch.bfloat16,
                     adapter_dtype=torch.float32, device=DEVICE)
    weight = params4bit(case.weight, nested=True)
    with warnings.catch_warnings():
        # a mismatch would warn and fall back to the reference
        warnings.simplefilter("error", verification.KernelVerificationWarning)
        y = lf.low_rank_linear(case.x, weight, case.lora_a, case.lora_b, bias=case.bias,
                               backend="triton", dropout_p=0.1, dropout_seed=5)
        y.float().sum().backward()
    assert set(verification._verdicts.values()) == {True} and len(verification._verdicts) == 2


# ---- routing ----

def quantized_choice(name, device):
    """The name of the backend ``dispatch.select`` picks for a (plain) 4-bit call."""
    return dispatch.select(name, device, four_bit=True).NAME


def test_quantized_choice_routes_4bit_calls(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(dispatch, "_load_cuda", lambda device: SimpleNamespace(NAME="cuda"))
    monkeypatch.setattr(dispatch, "_load_triton", lambda device: SimpleNamespace(NAME="triton"))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert quantized_choice("auto", cuda) == "triton"
    assert quantized_choice("triton", cuda) == "triton"
    assert quantized_choice("cuda", cuda) == "triton"  # no 4-bit C++ kernels
    assert quantized_choice("reference", cuda) == "reference"
    assert quantized_choice("auto", cpu) == "reference"
    assert quantized_choice("auto", torch.device("meta")) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert quantized_choice("auto", cuda) == "triton"
    monkeypatch.delenv(dispatch.ENV_VAR)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert quantized_choice("auto", cuda) == "reference"
    assert quantized_choice("cuda", cuda) == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        quantized_choice("bogus", cpu)


def test_asking_for_an_unavailable_backend_still_fails_clearly(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        quantized_choice("cuda", torch.device("cuda"))


@needs_triton_here
def test_4bit_calls_reach_the_triton_backend_and_qdora_stays_on_the_reference(monkeypatch):
    seen = []
    real_forward = triton_backend.forward
    monkeypatch.setattr(triton_backend, "forward",
                        lambda *a: seen.append("triton") or real_forward(*a))
    case = make_case((4,), K, N, 4, trainable={"lora_b"}, dtype=torch.float32, device=DEVICE)
    weight = params4bit(case.weight)
    lf.low_rank_linear(case.x, weight, case.lora_a, case.lora_b, backend="triton")
    assert seen == ["triton"]
    # QDoRA (a magnitude over a 4-bit base): the reference backend, whatever was asked
    from lowrank_fused import stats
    stats.reset(["qdora"])
    magnitude = torch.ones(N, requires_grad=True)
    y = lf.low_rank_linear(case.x, weight, case.lora_a, case.lora_b, magnitude=magnitude,
                           backend="triton", name="qdora")
    y.sum().backward()
    chosen = list(stats.snapshot()["qdora"])
    assert chosen == ["reference"] and seen == ["triton"] and magnitude.grad is not None
