"""Verified first use (lowrank_fused/verification.py): the first call of each kernel key is checked
against the reference backend; a wrong or failing kernel sends its key to the reference.

Runs the Triton backend on the CPU interpreter with LOWRANK_FUSED_VERIFY=on (the default "auto"
checks CUDA tensors only)."""
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

from helpers import make_case  # noqa: E402
from lowrank_fused import low_rank_linear, verification  # noqa: E402
from lowrank_fused.backends import triton as triton_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N, R = 48, 40, 8
TRAINABLE = {"lora": {"lora_a", "lora_b"}, "lora_xs": {"latent"}}


@pytest.fixture(autouse=True)
def verify_on(monkeypatch):
    monkeypatch.setenv(verification.ENV, "on")
    monkeypatch.delenv("LOWRANK_FUSED_TRITON_GEMM", raising=False)
    verification.reset()
    yield
    verification.reset()


@pytest.fixture
def check_calls(monkeypatch):
    """How many times each direction's check ran."""
    calls = {"forward": 0, "backward": 0}
    for direction, name in (("forward", "_forward_mismatch"), ("backward", "_backward_mismatch")):
        def counted(*args, _original=getattr(verification, name), _direction=direction,
                    **kwargs):
            calls[_direction] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(verification, name, counted)
    return calls


def case_of(m=37, method="lora", dtype=torch.float32, seed=0):
    return make_case((m,), K, N, R, trainable=TRAINABLE[method], latent=method == "lora_xs",
                     dtype=dtype, device=DEVICE, seed=seed)


def run(case, backend="triton", p=0.0):
    """y and the gradients of every tensor that requires grad, and the warnings raised."""
    names = [n for n, t in case.tensors().items() if t.requires_grad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                            latent=case.latent, scaling=case.scaling, dropout_p=p,
                            dropout_seed=5, backend=backend)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        grads = torch.autograd.grad(y, [case.tensors()[n] for n in names], grad_y)
    ours = [w for w in caught if issubclass(w.category, verification.KernelVerificationWarning)]
    return dict(y=y.detach(), **dict(zip(names, grads))), [str(w.message) for w in ours]


def corrupt(monkeypatch, name, how):
    """Replace the Triton kernel launcher ``name`` by ``how(original)``; returns its call count."""
    calls = []
    original = getattr(triton_backend.kernels, name)
    bad = how(original)

    def launcher(*args, **kwargs):
        calls.append(name)
        return bad(*args, **kwargs)
    monkeypatch.setattr(triton_backend.kernels, name, launcher)
    return calls


def perturbed(t):
    return t + 0.05 * (t.abs().max() + 1.0)


def perturb_result(original):
    return lambda *a, **k: perturbed(original(*a, **k))


def perturb_db(original):  # grad_output_pass returns (dp, db, dbias): dB wrong, the rest right
    def bad(*a, **k):
        dp, db, dbias = original(*a, **k)
        return dp, perturbed(db), dbias
    return bad


def raise_error(original):
    def bad(*a, **k):
        raise RuntimeError("boom: injected failure")
    return bad


def assert_same(got, want, exact=("x", "lora_a", "bias")):
    """Equal where the reference computed it (``exact``: bit for bit), else close."""
    assert set(got) == set(want)
    for name in want:
        if name in exact:
            assert torch.equal(got[name], want[name]), name
        else:  # from a Triton kernel, or from P computed by the Triton forward
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,p", [("lora", 0.0), ("lora_xs", 0.2)],
                         ids=["lora", "lora_xs_dropout"])
@pytest.mark.parametrize("budget", ["default", "tiny"])
def test_clean_kernel_is_checked_once_and_returned_unchanged(monkeypatch, check_calls, method, p,
                                                            budget):
    if budget == "tiny":  # many chunks of rows and slabs of W: the bounded-memory path
        monkeypatch.setattr(verification, "MIN_BUDGET_BYTES", 0)
    case = case_of(37, method)
    first, warned = run(case, p=p)
    assert warned == []
    assert check_calls == {"forward": 1, "backward": 1}
    assert all(verification.verdicts().values()) and len(verification.verdicts()) == 2
    again, warned = run(case_of(50, method), p=p)  # same M bucket (64): same key, no check
    assert warned == [] and check_calls == {"forward": 1, "backward": 1}
    run(case_of(70, method), p=p)  # M bucket 128: a new key, checked once
    assert check_calls == {"forward": 2, "backward": 2}
    # The kernel's own outputs, bit for bit: what the unchecked path returns.
    monkeypatch.setenv(verification.ENV, "off")
    unchecked, _ = run(case, p=p)
    for name in unchecked:
        assert torch.equal(first[name], unchecked[name]), name


@pytest.mark.parametrize("fault", [perturb_result, raise_error], ids=["wrong", "raises"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no_dropout", "dropout"])
def test_bad_forward_kernel_goes_to_reference(monkeypatch, check_calls, fault, p):
    calls = corrupt(monkeypatch, "fused_linear", fault)
    case = case_of(37)
    want, _ = run(case, backend="reference", p=p)
    got, warned = run(case, p=p)
    assert len(warned) == 1, warned
    assert "kernel triton forward" in warned[0] and "M=37" in warned[0] and "config:" in warned[0]
    assert ("RuntimeError: boom" if fault is raise_error else "y: kernel's max error") in warned[0]
    assert_same(got, want, exact=("y",))  # the reference's y, bit for bit
    assert calls == ["fused_linear"] and check_calls["forward"] == (fault is perturb_result)
    # Later calls of the key: the reference, without the kernel or a check, without a warning.
    got, warned = run(case, p=p)
    assert warned == [] and calls == ["fused_linear"]
    assert check_calls["forward"] == (fault is perturb_result)
    assert_same(got, want, exact=("y",))


@pytest.mark.parametrize("name,fault", [("grad_input", perturb_result),
                                        ("grad_a", perturb_result),
                                        ("grad_output_pass", perturb_db),
                                        ("grad_input", raise_error)],
                         ids=["dx_wrong", "dA_wrong", "dB_wrong", "raises"])
def test_bad_backward_kernel_goes_to_reference(monkeypatch, check_calls, name, fault):
    calls = corrupt(monkeypatch, name, fault)
    case = case_of(37)
    want, _ = run(case, backend="reference", p=0.2)
    got, warned = run(case, p=0.2)
    assert len(warned) == 1, warned
    assert "kernel triton backward" in warned[0] and "M=37" in warned[0]
    expected = {"grad_input": "dx: kernel's max error", "grad_a": "dA: kernel's max error",
                "grad_output_pass": "dB: kernel's max error"}[name]
    assert ("RuntimeError: boom" if fault is raise_error else expected) in warned[0]
    assert_same(got, want)
    assert check_calls == {"forward": 1, "backward": int(fault is not raise_error)}
    verdicts = verification.verdicts()
    assert sorted(verdicts.values()) == [False, True]  # forward passed, backward did not
    got, warned = run(case, p=0.2)
    assert warned == [] and calls == [name]  # the bad kernel ran once: on the checked call
    assert check_calls == {"forward": 1, "backward": int(fault is not raise_error)}
    assert_same(got, want)


def test_off_disables_the_check(monkeypatch, check_calls):
    monkeypatch.setenv(verification.ENV, "off")
    calls = corrupt(monkeypatch, "fused_linear", perturb_result)
    case = case_of(37)
    want, _ = run(case, backend="reference")
    got, warned = run(case)
    assert warned == [] and calls == ["fused_linear"]
    assert check_calls == {"forward": 0, "backward": 0} and verification.verdicts() == {}
    assert not torch.equal(got["y"], want["y"])  # the corrupted kernel's output went through


@pytest.mark.skipif(DEVICE == "cuda", reason="auto checks CUDA tensors")
def test_auto_leaves_cpu_tensors_alone(monkeypatch, check_calls):
    monkeypatch.delenv(verification.ENV)
    run(case_of(37))
    assert check_calls == {"forward": 0, "backward": 0} and verification.verdicts() == {}


@pytest.mark.parametrize("value", ["maybe", "1", "true"])
def test_bad_value_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(verification.ENV, value)
    with pytest.raises(ValueError, match="LOWRANK_FUSED_VERIFY.*auto.*on.*off"):
        run(case_of(37))


def test_gemm_variant_is_part_of_the_key(monkeypatch, check_calls):
    case = case_of(37)
    run(case)
    monkeypatch.setenv("LOWRANK_FUSED_TRITON_GEMM", "tma")
    run(case)
    assert check_calls == {"forward": 2, "backward": 2}


def test_skipped_while_tracing(monkeypatch, check_calls):
    """Under torch.compile tracing (and CUDA graph capture) the kernel runs unchecked."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    case = case_of(37)
    args = (case.x.detach(), case.weight.detach(), case.bias.detach(), case.lora_a.detach(),
            case.lora_b.detach(), case.scaling, None)
    y, p = verification.forward(triton_backend, *args)
    assert check_calls["forward"] == 0 and verification.verdicts() == {}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    y2, p2 = verification.forward(triton_backend, *args)
    assert check_calls["forward"] == 1 and torch.equal(y, y2) and torch.equal(p, p2)


def test_an_argument_error_reaches_the_user(monkeypatch, check_calls):
    """A backend refusing its arguments (its message says what to change) is not a kernel fault:
    the error propagates instead of a silent switch to the reference."""
    def refuse(original):
        def bad(*a, **k):
            raise TypeError("backend 'triton' supports float16, bfloat16 and float32")
        return bad
    corrupt(monkeypatch, "fused_linear", refuse)
    with pytest.raises(TypeError, match="supports float16"):
        run(case_of(37))
    assert verification.verdicts() == {}


# ---- DoRA calls and 4-bit weights: the same first-use check ----

@pytest.fixture
def dora_check_calls(monkeypatch):
    """How many times each DoRA direction's check ran."""
    calls = {"forward": 0, "backward": 0}
    for direction, name in (("forward", "_dora_forward_mismatch"),
                            ("backward", "_dora_backward_mismatch")):
        def counted(*args, _original=getattr(verification, name), _direction=direction,
                    **kwargs):
            calls[_direction] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(verification, name, counted)
    return calls


def dora_case(m=37, bias=True, train_a=True, dtype=torch.float32, seed=0):
    case = make_case((m,), K, N, R, trainable={"lora_a", "lora_b"} if train_a else {"lora_b"},
                     bias=bias, dtype=dtype, adapter_dtype=torch.float32, device=DEVICE,
                     seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    magnitude = (torch.rand(N, generator=g) + 0.5).to(DEVICE).requires_grad_()
    return case, magnitude


def run_dora(case, magnitude, backend="triton", p=0.0):
    """y and every gradient (dm too) of one DoRA call, and the warnings raised."""
    tensors = dict(case.tensors(), magnitude=magnitude)
    names = [n for n, t in tensors.items() if t.requires_grad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                            scaling=case.scaling, dropout_p=p, dropout_seed=5, backend=backend,
                            magnitude=magnitude)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        grads = torch.autograd.grad(y, [tensors[n] for n in names], grad_y)
    ours = [w for w in caught if issubclass(w.category, verification.KernelVerificationWarning)]
    return dict(y=y.detach(), **dict(zip(names, grads))), [str(w.message) for w in ours]


@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.0), (True, 0.2), (False, 0.2)],
                         ids=["bias", "z_from_y", "bias_dropout", "dropout"])
def test_clean_dora_kernels_are_checked_once_and_returned_unchanged(monkeypatch,
                                                                   dora_check_calls, bias, p):
    case, magnitude = dora_case(bias=bias)
    first, warned = run_dora(case, magnitude, p=p)
    assert warned == []
    assert dora_check_calls == {"forward": 1, "backward": 1}
    assert all(verification.verdicts().values()) and len(verification.verdicts()) == 2
    assert {key[1] for key in verification.verdicts()} == {"DoRA forward", "DoRA backward"}
    run_dora(*dora_case(m=50, bias=bias), p=p)  # same M bucket: same keys, no check
    assert dora_check_calls == {"forward": 1, "backward": 1}
    monkeypatch.setenv(verification.ENV, "off")
    unchecked, _ = run_dora(case, magnitude, p=p)
    for name in unchecked:  # the kernels' own outputs, bit for bit
        assert torch.equal(first[name], unchecked[name]), name


def perturb_first(original):  # dora_linear returns (y, z): y wrong
    def bad(*a, **k):
        y, z = original(*a, **k)
        return perturbed(y), z
    return bad


def perturb_dm(original):  # dora_grad_output_pass returns (dp, db, dbias, Σ G ⊙ Z): dm wrong
    def bad(*a, **k):
        dp, db, dbias, gz = original(*a, **k)
        return dp, db, dbias, perturbed(gz)
    return bad


@pytest.mark.parametrize("name,fault,direction,expected", [
    ("dora_linear", perturb_first, "forward", "y: kernel's max error"),
    ("dora_linear", raise_error, "forward", "RuntimeError: boom"),
    ("dora_grad_input", perturb_result, "backward", "dx: kernel's max error"),
    ("dora_grad_output_pass", perturb_dm, "backward", "dm: kernel's max error"),
], ids=["y_wrong", "forward_raises", "dx_wrong", "dm_wrong"])
def test_bad_dora_kernel_goes_to_reference(monkeypatch, name, fault, direction, expected):
    calls = corrupt(monkeypatch, name, fault)
    case, magnitude = dora_case(bias=False)
    want, _ = run_dora(case, magnitude, backend="reference", p=0.2)
    got, warned = run_dora(case, magnitude, p=0.2)
    assert len(warned) == 1, warned
    assert f"kernel triton DoRA {direction}" in warned[0] and "M=37" in warned[0]
    assert expected in warned[0]
    exact = ("y",) if direction == "forward" else ("x", "lora_a", "bias")  # dm: Z from a kernel
    assert_same(got, want, exact=exact)
    got, warned = run_dora(case, magnitude, p=0.2)  # later calls: the reference, no warning
    assert warned == [] and calls == [name]
    assert_same(got, want, exact=exact)


def case_4bit():
    """K = 70: the 4-bit GEMMs are wrong on the interpreter where K is a multiple of 16 but not
    of 64 (K = 16, 32, 48, 96, on main as well); a kernel defect beside this check's subject."""
    return make_case((37,), 70, 50, R, trainable=TRAINABLE["lora"], dtype=torch.float32,
                     device=DEVICE)


def _params4bit(weight, quant_type, nested):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False,
                             quant_type=quant_type, blocksize=64,
                             compress_statistics=nested).to(DEVICE)


def test_each_4bit_format_is_its_own_kernel_key(monkeypatch, check_calls):
    """NF4 and nested FP4 run different code (nesting and the blocksize are compile-time
    constants): a 4-bit GEMM that is wrong only for a nested weight is caught on the nested
    weight's first call, though a plain one passed before."""
    from lowrank_fused.backends.triton import kernels_4bit
    original = kernels_4bit.fused_linear_4bit

    def wrong_when_nested(x, w, *args, **kwargs):
        y = original(x, w, *args, **kwargs)
        return perturbed(y) if w.code2 is not None else y
    monkeypatch.setattr(kernels_4bit, "fused_linear_4bit", wrong_when_nested)

    case = case_4bit()
    plain, nested = (_params4bit(case.weight, "nf4", False), _params4bit(case.weight, "fp4", True))
    for weight in (plain, nested):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = low_rank_linear(case.x, weight, case.lora_a, case.lora_b, bias=case.bias,
                                scaling=case.scaling, backend="triton")
        warned = [str(w.message) for w in caught
                  if issubclass(w.category, verification.KernelVerificationWarning)]
        want = low_rank_linear(case.x, weight, case.lora_a, case.lora_b, bias=case.bias,
                               scaling=case.scaling, backend="reference")
        if weight is plain:
            assert warned == [] and torch.allclose(y, want, rtol=1e-4, atol=1e-5)
        else:
            assert len(warned) == 1 and "kernel triton forward" in warned[0], warned
            assert "4-bit fp4 weight (blocksize 64, nested absmax" in warned[0]
            assert torch.equal(y, want)  # the reference's y
    assert check_calls["forward"] == 2


def test_a_bad_4bit_grad_input_goes_to_reference(monkeypatch):
    from lowrank_fused.backends.triton import kernels_4bit
    monkeypatch.setattr(kernels_4bit, "grad_input_4bit",
                        perturb_result(kernels_4bit.grad_input_4bit))
    case = case_4bit()
    weight = _params4bit(case.weight, "nf4", True)
    names = [n for n, t in case.tensors().items() if t.requires_grad and n != "weight"]
    results = {}
    for backend in ("reference", "triton"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = low_rank_linear(case.x, weight, case.lora_a, case.lora_b, bias=case.bias,
                                scaling=case.scaling, backend=backend)
            grads = torch.autograd.grad(y.sum(), [case.tensors()[n] for n in names])
        results[backend] = dict(zip(names, grads))
        warned = [str(w.message) for w in caught
                  if issubclass(w.category, verification.KernelVerificationWarning)]
    assert len(warned) == 1 and "kernel triton backward" in warned[0]
    assert "dx: kernel's max error" in warned[0]
    assert torch.equal(results["triton"]["x"], results["reference"]["x"])
