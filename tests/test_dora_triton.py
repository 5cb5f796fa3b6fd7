"""DoRA on the Triton backend (triton_kernels/dora.py) against the spec in float64, under the one
tolerance rule (tests/tolerance.py), on CPU under TRITON_INTERPRET=1 or on CUDA; and the
routing of DoRA calls (dispatch.select)."""
from types import SimpleNamespace

import pytest
import torch

import pairwise

pytest.importorskip("triton", reason="the triton package is not installed")

import lowrank_fused as lf  # noqa: E402
from helpers import grad_output, spec_results  # noqa: E402
from lowrank_fused import dispatch  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N = 100, 80  # not multiples of any block size
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make(m_shape, r, dtype, *, bias=True, train_a=True, train_m=True, x_grad=True, latent=False,
         seed=0):
    """Leaves of one DoRA call: fp32 adapters and magnitude (as PEFT keeps them), base in
    ``dtype``; every tensor's trainable flag as asked."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, dt, grad, scale=1.0, shift=0.0):
        v = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return v.to(dt).to(DEVICE).requires_grad_(grad)

    f32 = torch.float32
    return dict(
        x=t(*m_shape, K, dt=dtype, grad=x_grad),
        weight=t(N, K, dt=dtype, grad=False, scale=K ** -0.5),
        bias=t(N, dt=dtype, grad=True) if bias else None,
        lora_a=t(r, K, dt=f32, grad=train_a, scale=K ** -0.5),
        lora_b=t(N, r, dt=f32, grad=not latent, scale=r ** -0.5),
        latent=t(r, r, dt=f32, grad=True, scale=r ** -0.5) if latent else None,
        # m around ‖W_n‖ (≈ 1 here), not equal to it, so c − 1 is not 0
        magnitude=t(N, dt=f32, grad=train_m, scale=0.2, shift=1.0),
    )


def cast(leaves, base=None, adapters=None):
    """The same leaves with the base tensors in ``base`` and the adapters and magnitude in
    ``adapters`` (None: unchanged), same trainable flags and x's strides where no cast."""
    out = {}
    for name, t in leaves.items():
        dt = adapters if name in ("lora_a", "lora_b", "latent", "magnitude") else base
        if t is None or dt is None or t.dtype == dt:
            out[name] = t
        else:
            out[name] = t.detach().to(dt).requires_grad_(t.requires_grad)
    return out


SCALING, SEED = 0.75, 11


def run(leaves, backend, p, seed=SEED, grad_dtype=None):
    """y and the gradient of every leaf that requires grad; grad_y's values rounded to
    ``grad_dtype`` (default y's dtype)."""
    y = lf.low_rank_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                           bias=leaves["bias"], latent=leaves["latent"], scaling=SCALING,
                           dropout_p=p, dropout_seed=seed, magnitude=leaves["magnitude"],
                           backend=backend)
    grad_y = grad_output(y.shape, grad_dtype or y.dtype).to(y)
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_y)
    return dict(y=y, **{f"d{n}": g for n, g in zip(names, grads)})


def check(leaves, dtype, p):
    """Triton against the spec in float64 (the same seed: the same mask bits), within the rule;
    PyTorch's low-precision run of the same math is the reference backend with the adapters in
    the base's dtype over a 16-bit base (the kernels' low-rank dots take 16-bit operands
    there)."""
    got = run(leaves, "triton", p)
    grad_dtype = got["y"].dtype
    low = cast(leaves, adapters=None if dtype == torch.float32 else dtype)
    torch_low = run(low, "reference", p, grad_dtype=grad_dtype)
    truth = spec_results(leaves, grad_output(got["y"].shape, grad_dtype), scaling=SCALING, p=p,
                         seed=SEED)
    want64 = {name if name == "y" else f"d{name}": t for name, t in truth.items()}
    assert set(got) == set(want64)
    for name in want64:
        ref_dtype = (leaves[name[1:]].dtype if name != "y" else leaves["x"].dtype)
        assert got[name].dtype == ref_dtype, name
        assert_kernel_close(got[name], want64[name], torch_low[name].to(got[name].dtype), name,
                            dtype)
    return got


# Every pair of levels at least once (the full product under LOWRANK_FUSED_EXHAUSTIVE=1).
CASES = pairwise.cases(dict(
    m=[1, 37], rank=[1, 12, 25, 64], dtype=[torch.float32, torch.bfloat16, torch.float16],
    p=[0.0, 0.2], bias=[True, False], train_a=[True, False], train_m=[True, False],
    x_grad=[True, False]))


def _case_id(m, rank, dtype, p, bias, train_a, train_m, x_grad):
    return (f"{m}-r{rank}-{DTYPE_IDS[dtype]}-{'dropout' if p else 'no_dropout'}-"
            f"{'bias' if bias else 'no_bias'}-{'lora' if train_a else 'dora_fa'}-"
            f"{'m' if train_m else 'm_frozen'}-{'dx' if x_grad else 'no_dx'}")


@pytest.mark.parametrize("m,rank,dtype,p,bias,train_a,train_m,x_grad", CASES,
                         ids=[_case_id(*c) for c in CASES])
def test_matches_float64_reference(m, rank, dtype, p, bias, train_a, train_m, x_grad):
    leaves = make((m,), rank, dtype, bias=bias, train_a=train_a, train_m=train_m,
                  x_grad=x_grad, seed=m + rank)
    check(leaves, dtype, p)


def test_three_d_and_non_contiguous_x_and_latent():
    leaves = make((3, 13), 12, torch.float32, seed=5)
    check(leaves, torch.float32, 0.2)
    x = leaves["x"].detach().reshape(-1, K).T.contiguous().T  # rows strided
    assert not x.is_contiguous()
    check(dict(leaves, x=x.requires_grad_()), torch.float32, 0.2)
    # LoRA-XS's latent R (B_eff = B·Rᵀ; dR through the same pass over G)
    check(make((37,), 12, torch.bfloat16, latent=True, train_a=False, seed=6), torch.bfloat16,
          0.0)


def test_same_mask_as_the_reference_backend():
    """With dropout, the Triton forward equals the reference backend's at the same seed (to
    fp32 rounding) and differs at another seed: the mask is the reference's, bit for bit."""
    leaves = make((37,), 12, torch.float32, seed=7)
    got = run(leaves, "triton", 0.3, seed=99)
    want = run(leaves, "reference", 0.3, seed=99)
    other = run(leaves, "reference", 0.3, seed=100)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-5, atol=2e-5)
    assert not torch.allclose(got["y"], other["y"], rtol=1e-3, atol=1e-3)


def test_deterministic_reductions_are_reproducible():
    leaves = make((37,), 12, torch.bfloat16, seed=8)
    torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS only warns on GPU
    try:
        first = check(leaves, torch.bfloat16, 0.1)
        second = run(leaves, "triton", 0.1)
        for name in first:
            assert torch.equal(first[name], second[name]), name
    finally:
        torch.use_deterministic_algorithms(False)


def test_empty_batch():
    leaves = make((0,), 4, torch.float32, seed=9)
    got, want = run(leaves, "triton", 0.1), run(leaves, "reference", 0.1)
    for name in want:
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name])


def test_under_autocast_adapters_keep_their_dtype():
    """A bf16 autocast over an fp32 layer: the base runs in bf16, the adapters and m keep fp32
    (on both backends: the reference's backward used to mix a bf16 P with fp32 gradients)."""
    leaves = make((37,), 12, torch.float32, seed=10)
    results = {}
    for backend in ("reference", "triton"):
        with torch.autocast("cuda" if DEVICE == "cuda" else "cpu", dtype=torch.bfloat16):
            results[backend] = run(leaves, backend, 0.1, grad_dtype=torch.bfloat16)
    for name, got in results["triton"].items():
        want = results["reference"][name]
        assert got.dtype == want.dtype, name
        scale = want.double().abs().max().item()
        assert (got.double() - want.double()).abs().max().item() <= 0.05 * scale, name


# --- routing (dispatch-level: no GPU needed) ----------------------------------------------

def test_dora_routing(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(dispatch, "_load_cuda", lambda device: SimpleNamespace(NAME="cuda"))

    def dora_choice(name, device, four_bit=False):
        return dispatch.select(name, device, dora=True, four_bit=four_bit).NAME

    # auto without a call to time (no details): Triton, its first fused contender, on CUDA; the
    # reference elsewhere; "cuda" runs DoRA on Triton (the extension has no DoRA kernels)
    assert dora_choice("auto", cuda) == "triton"
    assert dora_choice("auto", cpu) == "reference"
    assert dora_choice("triton", cuda) == "triton"
    assert dora_choice("cuda", cuda) == "triton"
    assert dora_choice("reference", cuda) == "reference"
    assert dora_choice("triton", torch.device("meta")) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dora_choice("auto", cuda) == "triton"
    monkeypatch.delenv(dispatch.ENV_VAR)
    # QDoRA stays on the reference whatever was asked, and whatever 4-bit plain calls take
    assert dispatch.select("triton", cuda, four_bit=True).NAME == "triton"
    for name in ("auto", "triton", "cuda", "reference"):
        assert dora_choice(name, cuda, four_bit=True) == "reference"
    # without triton, auto falls back to the reference; "cuda" says what is missing
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dora_choice("auto", cuda) == "reference"
    with pytest.raises(dispatch.BackendUnavailableError, match="triton"):
        dora_choice("cuda", cuda)
    monkeypatch.undo()
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cuda'"):
        dora_choice("cuda", cpu)


def test_qdora_runs_on_the_reference(monkeypatch):
    """A 4-bit weight with a magnitude: the reference backend's DoRA, even with backend="triton",
    which sends plain 4-bit calls to Triton."""
    bnb = pytest.importorskip("bitsandbytes")
    from lowrank_fused.backends import pytorch as reference
    from lowrank_fused.backends import triton as triton_backend
    import qlora_helpers
    torch.manual_seed(0)
    layer = qlora_helpers.linear4bit(torch.nn.Linear(64, 32))
    assert isinstance(layer.weight, bnb.nn.Params4bit)

    def refuse(*args, **kwargs):
        raise AssertionError("QDoRA reached the Triton backend")

    monkeypatch.setattr(triton_backend, "dora_forward", refuse)
    calls = []
    real = reference.dora_forward
    monkeypatch.setattr(reference, "dora_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 64)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(32, 4) * 0.1
    m = torch.rand(32) + 0.5
    lf.low_rank_linear(x, layer.weight, a, b, magnitude=m, backend="triton")
    assert calls == [1]
