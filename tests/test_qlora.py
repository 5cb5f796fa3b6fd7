"""QLoRA: a bitsandbytes 4-bit frozen base (Params4bit) under the operator, the layer, the
surgery and PEFT's Linear4bit layers served by enable_fused."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="the bitsandbytes package is not installed")

import lowrank_fused as lf  # noqa: E402
from lowrank_fused import dispatch, quantized, stats  # noqa: E402
from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused.saved_activations import SavedActivations  # noqa: E402

from helpers import Case, case_spec_results, grads_of, naive_forward  # noqa: E402
from lowrank_fused import spec  # noqa: E402
from peft_helpers import Small, counting_ops, nonzero_b  # noqa: E402
from qlora_helpers import linear4bit, quantize_model  # noqa: E402
from tolerance import assert_kernel_close  # noqa: E402

M_SHAPE, K, N, R = (3, 5), 128, 48, 4
METHODS = {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"}, "lora_xs": {"latent"}}


def params4bit(n=N, k=K, quant_type="nf4", blocksize=64, nested=False, dtype=torch.float32,
               seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    return bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, blocksize=blocksize,
                             compress_statistics=nested).to("cpu")  # .to() quantizes


def adapters(method, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    trains = METHODS[method]

    def t(*shape, name, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(name in trains)
    return (t(R, K, name="lora_a", scale=K ** -0.5), t(N, R, name="lora_b", scale=R ** -0.5),
            t(R, R, name="latent", scale=R ** -0.5) if method == "lora_xs" else None)


# ---- the operator: reference path against float64 on the dequantized weight ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("quant_type,blocksize,nested",
                         [("nf4", 64, False), ("nf4", 128, True), ("fp4", 64, True),
                          ("fp4", 128, False)])
def test_reference_matches_float64_on_the_dequantized_weight(quant_type, blocksize, nested,
                                                             dropout, method, dtype):
    weight = params4bit(quant_type=quant_type, blocksize=blocksize, nested=nested, dtype=dtype)
    assert weight.quant_state.quant_type == quant_type and weight.quant_state.nested == nested
    lora_a, lora_b, latent = adapters(method)  # fp32 adapters over the base, as PEFT keeps them
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*M_SHAPE, K, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype)
    seed = 1234
    y = lf.low_rank_linear(x, weight, lora_a, lora_b, bias=bias, latent=latent, scaling=0.5,
                           dropout_p=dropout, dropout_seed=seed, backend="reference")
    assert y.dtype == dtype and y.shape == (*M_SHAPE, N)

    dense = quantized.dequantize(weight, dtype)
    assert dense.shape == (N, K)
    case = Case(x=x, weight=dense, lora_a=lora_a, lora_b=lora_b, bias=bias, latent=latent,
                scaling=0.5)
    mask = spec.keep_mask(x.shape, seed, dropout) if dropout else None
    low = naive_forward(case, mask, dropout)

    grad_out = torch.randn(y.shape, generator=g).to(dtype)
    want = case_spec_results(case, grad_out, dropout, seed)  # float64, over the dense W
    assert_kernel_close(y, want["y"], low, "y")
    wanted = {k: v for k, v in case.tensors().items() if v.requires_grad}
    assert "x" in wanted and (set(wanted) - {"x"}) == METHODS[method]
    got = grads_of(y, grad_out, wanted)
    low_g = grads_of(low, grad_out, wanted)
    for name in wanted:
        assert_kernel_close(got[name], want[name], low_g[name], f"d{name}")


def test_equals_bitsandbytes_own_matmul():
    lin = linear4bit(nn.Linear(K, N), "nf4", 64, True)
    x = torch.randn(2, 7, K)
    lora_a, lora_b, _ = adapters("lora")
    y = lf.low_rank_linear(x, lin.weight, lora_a, lora_b * 0, bias=lin.bias)
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)


def test_a_frozen_keeps_no_x_and_no_dense_weight():
    for method, expected in [("lora_fa", None), ("lora_xs", None), ("lora", K)]:
        lin = linear4bit(nn.Linear(K, N), "nf4", 64, True)
        layer = lf.LowRankLinear.from_linear(lin, R, method, dropout=0.1)
        assert layer.weight is lin.weight and quantized.is_4bit(layer.weight)
        x = torch.randn(*M_SHAPE, K, requires_grad=True)
        with SavedActivations(layer) as saved:
            loss = layer(x).sum()
        loss.backward()
        m = x[..., 0].numel()
        numels = sorted(t.numel() for t in saved.tensors)
        assert N * K not in numels, saved.shapes()  # never the dense W
        assert numels == sorted([m * R] + ([m * K] if expected else [])), (method, saved.shapes())
        assert x.grad is not None and lin.weight.grad is None


def test_layer_lora_xs_initialises_from_the_dequantized_weight():
    lin = linear4bit(nn.Linear(K, N), "fp4", 128, False)
    layer = lf.LowRankLinear.from_linear(lin, R, "lora_xs")
    dense = quantized.dequantize(lin.weight, torch.float32)
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    torch.testing.assert_close((layer.lora_b.double() @ layer.lora_a.double()), best,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge()


def test_apply_low_rank_on_a_4bit_model_and_compute_dtype():
    model = quantize_model(Small(), names=["q", "v"], compute_dtype=torch.bfloat16)
    summary = lf.apply_low_rank(model, ["q", "v"], rank=R, method="lora_fa")
    assert summary.replaced == ["q", "v"]
    assert model.q.lora_a.dtype == torch.float32 and model.q.compute_dtype == torch.bfloat16
    x = torch.randn(3, 16)
    out = model(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == \
        ["q.lora_b", "v.lora_b"]


# ---- errors ----

@pytest.mark.parametrize("damage,message", [
    ("no_state", "no quant_state"),
    ("absmax", "missing absmax"),
    ("code", "missing code"),
    ("state2", "state2"),
    ("quant_type", "quant_type must be one of"),
])
def test_a_partial_quant_state_is_a_clear_error(damage, message):
    weight = params4bit(nested=True)
    if damage == "no_state":
        weight.quant_state = None
    else:
        state = copy.copy(weight.quant_state)
        setattr(state, damage, "int8" if damage == "quant_type" else None)
        weight.quant_state = state
    lora_a, lora_b, _ = adapters("lora")
    with pytest.raises(ValueError, match=message):
        lf.low_rank_linear(torch.randn(2, K), weight, lora_a, lora_b)


def test_shapes_are_checked_against_the_quant_state():
    weight = params4bit()
    lora_a, lora_b, _ = adapters("lora")
    with pytest.raises(ValueError, match="K = weight.shape"):
        lf.low_rank_linear(torch.randn(2, K // 2), weight, lora_a, lora_b)
    with pytest.raises(ValueError, match="lora_b"):
        lf.low_rank_linear(torch.randn(2, K), weight, lora_a, lora_b[:-1])


# ---- backends: which backend runs a 4-bit call (tests/test_qlora_triton.py: the kernels) ----

@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_4bit_calls_take_triton_when_asked_and_the_reference_on_cpu(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    name = f"4-bit {backend}"
    stats.reset([name])
    weight = params4bit()
    lora_a, lora_b, _ = adapters("lora_fa")
    lf.low_rank_linear(torch.randn(2, K), weight, lora_a.detach(), lora_b.detach(),
                       backend=backend, name=name)
    # "triton": the 4-bit kernels (dequantizing inside their K loops); "auto" on CPU tensors:
    # the reference, as for a dense weight
    seen = list(stats.snapshot()[name])
    assert seen == ["triton" if backend == "triton" else "reference"]
    assert dispatch.select("reference", torch.device("cuda"), four_bit=True).NAME == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.select("bogus", torch.device("cpu"), four_bit=True)


# ---- PEFT: lora.bnb.Linear4bit served by enable_fused ----

def qlora_peft(method="lora", dropout=0.0, compute_dtype=torch.float32, **options):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = quantize_model(Small(), names=["q", "v"], compute_dtype=compute_dtype, **options)
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=["q", "v"],
                                                  lora_dropout=dropout))
    nonzero_b(peft_model)
    if method == "lora_fa":
        lfp.freeze_lora_a(peft_model)
    if method == "lora_xs":
        lfp.convert_to_lora_xs(peft_model, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            for latent in lfp.latents(peft_model).values():
                latent.normal_(0, 0.1)
    return peft_model


def run(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad()
    y = model(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("method", list(METHODS))
def test_enable_fused_serves_peft_linear4bit_with_peft_outputs_and_grads(method):
    model = qlora_peft(method, quant_type="nf4", blocksize=64, nested=True)
    from peft.tuners.lora.bnb import Linear4bit
    assert isinstance(model.base_model.model.q, Linear4bit)
    x = torch.randn(3, 5, 16)
    y0, dx0, g0 = run(model, x)
    fused = lfp.enable_fused(model)
    assert fused.served == ["base_model.model.q", "base_model.model.v"] and not fused.fallbacks
    with counting_ops() as calls:
        y1, dx1, g1 = run(model, x)
    assert len(calls) == 2
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    trained = {"lora": "lora_", "lora_fa": "lora_B", "lora_xs": "latent"}[method]
    assert set(g1) == set(g0) and any(trained in n for n in g1), sorted(g1)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
    fused.disable()
    assert type(model.base_model.model.q) is Linear4bit


def test_a_served_4bit_model_prints_as_peft_prints_it():
    model = qlora_peft()
    before = repr(model)
    fused = lfp.enable_fused(model)
    assert fused.served and repr(model) == before
    assert repr(model.base_model.model.q).startswith("lora.Linear4bit(")
    fused.disable()


def test_bf16_compute_and_dropout_keep_less_than_peft():
    model = qlora_peft("lora_fa", dropout=0.1, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 8, 16)

    def saved_bytes():
        with SavedActivations(model) as saved:
            loss = model(x).float().pow(2).sum()
        loss.backward()
        return saved.nbytes

    peft_bytes = saved_bytes()
    fused = lfp.enable_fused(model)
    with counting_ops() as calls:
        fused_bytes = saved_bytes()
    assert len(calls) == 2 and not fused.fallbacks
    assert fused_bytes < peft_bytes, (fused_bytes, peft_bytes)


def test_peft_save_and_load_with_a_4bit_base(tmp_path):
    from peft import PeftModel
    model = qlora_peft("lora")
    lfp.enable_fused(model)
    x = torch.randn(2, 16)
    want = model(x).detach()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    torch.manual_seed(0)
    base = quantize_model(Small(), names=["q", "v"])
    loaded = PeftModel.from_pretrained(base, tmp_path)
    fused = lfp.enable_fused(loaded)
    assert len(fused.served) == 2
    with counting_ops() as calls:
        got = loaded(x)
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_8bit_base_is_reported_with_the_reason(caplog):
    from peft import LoraConfig, get_peft_model
    model = Small()
    lin8 = bnb.nn.Linear8bitLt(16, 24, has_fp16_weights=False)
    model.q = lin8
    model.is_loaded_in_8bit = True
    try:
        peft_model = get_peft_model(model, LoraConfig(r=R, target_modules=["q", "v"]))
    except Exception as err:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"an 8-bit PEFT layer cannot be built here: {err}")
    with caplog.at_level("INFO", logger="lowrank_fused.peft"):
        fused = lfp.enable_fused(peft_model)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "1/2 LoRA layers served" in caplog.text and "Linear8bitLt" in caplog.text
    assert "8-bit" in fused.fallbacks["base_model.model.q"]
    assert fused.served == ["base_model.model.v"]


def test_import_works_without_bitsandbytes():
    code = textwrap.dedent("""
        import sys
        sys.modules["bitsandbytes"] = None  # blocks the import
        import torch
        import lowrank_fused as lf
        from lowrank_fused import peft as lfp, quantized
        sys.path.insert(0, "tests")
        from peft_helpers import small_peft
        model = small_peft()
        fused = lfp.enable_fused(model)
        assert len(fused.served) == 2 and not fused.fallbacks, fused
        model(torch.randn(2, 16)).sum().backward()
        assert not quantized.is_4bit(torch.zeros(2))
        assert "bitsandbytes" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_torch_compile_runs_a_4bit_call():
    lin = linear4bit(nn.Linear(K, N), "nf4", 64, False)
    layer = lf.LowRankLinear.from_linear(lin, R, "lora_fa")
    x = torch.randn(3, K)
    want = layer(x)
    torch._dynamo.reset()
    got = torch.compile(layer, backend="eager")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    assert layer.lora_b.grad is not None
    torch._dynamo.reset()
    # fullgraph: no graph break (the quant state crosses the custom ops as tensors)
    got = torch.compile(layer, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class Siblings(nn.Module):
    """q, k, v read one x (as attention's projections read one normed hidden state)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(K, N) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_sibling_layers_share_one_cast_of_x(monkeypatch):
    """An fp32 model over bf16-computing 4-bit bases, A trainable: q/k/v keep one bf16 copy of
    their common x for dA, not one each; outputs and gradients are bit-identical to casting per
    layer."""
    from peft import LoraConfig, get_peft_model
    from lowrank_fused.peft import serving
    torch.manual_seed(0)
    model = quantize_model(Siblings(), compute_dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=["q", "k", "v"]))
    nonzero_b(model)
    lfp.enable_fused(model)
    x = torch.randn(3, 7, K)

    def step():
        x1 = x.clone().requires_grad_()
        model.zero_grad()
        with SavedActivations(model) as saved, counting_ops() as calls:
            y = model(x1)
        y.pow(2).sum().backward()
        assert len(calls) == 3
        copies = {t.untyped_storage().data_ptr() for t in saved.tensors
                  if t.dtype == torch.bfloat16 and tuple(t.shape) == (21, K)}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return len(copies), y.detach(), x1.grad, grads

    shared, y0, dx0, g0 = step()
    monkeypatch.setattr(serving, "shared_cast", lambda t, dtype: t.to(dtype))
    per_layer, y1, dx1, g1 = step()
    assert (shared, per_layer) == (1, 3)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert set(g0) == set(g1) and len(g0) == 6
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_shared_cast_only_reuses_an_unchanged_input():
    from lowrank_fused.peft import input_cast
    input_cast.clear()
    x = torch.randn(4, 8)
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    first = input_cast.shared_cast(x, torch.bfloat16)
    assert torch.equal(first, x.to(torch.bfloat16))
    assert storage(input_cast.shared_cast(x, torch.bfloat16)) == storage(first)
    assert input_cast.shared_cast(x, torch.float32) is x                 # no cast needed
    assert storage(input_cast.shared_cast(x, torch.float16)) != storage(first)  # another dtype
    x.add_(1.0)                                                           # changed in place
    changed = input_cast.shared_cast(x, torch.bfloat16)
    assert torch.equal(changed, x.to(torch.bfloat16))
    x.requires_grad_()
    with_grad = input_cast.shared_cast(x, torch.bfloat16)
    assert with_grad.grad_fn is not None and storage(with_grad) == storage(changed)
    (with_grad.float() * 3).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, torch.full_like(x, 3.0))
    with torch.no_grad():
        assert input_cast.shared_cast(x, torch.bfloat16).grad_fn is None
    y = torch.randn(4, 8)
    assert storage(input_cast.shared_cast(y, torch.bfloat16)) != storage(changed)  # another x
    del y
    assert input_cast._last.entry is None                       # forgotten with its source


# ---- QDoRA: DoRA's magnitude over a 4-bit base ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dora_over_4bit_equals_dora_over_the_dequantized_weight(dtype, dropout):
    """The 4-bit path is the dense path on bitsandbytes' dequantized W, bit for bit: the norm's
    terms come from it, forward and backward dequantize per call."""
    w4 = params4bit(quant_type="fp4", nested=True, dtype=dtype)
    dense = quantized.dequantize(w4, dtype)
    a, b, _ = adapters("lora")
    m = (torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_()
    x = torch.randn(*M_SHAPE, K, dtype=dtype)
    results = []
    for weight in (w4, dense):
        xx = x.clone().requires_grad_()
        y = lf.low_rank_linear(xx, weight, a, b, scaling=2.0, magnitude=m, dropout_p=dropout,
                               dropout_seed=11, training=True)
        results.append([y.detach()] + list(torch.autograd.grad(y.float().pow(2).sum(),
                                                               (xx, a, b, m))))
    for name, got, want in zip(("y", "dx", "dA", "dB", "dm"), *results):
        assert torch.equal(got, want), name


def test_dora_norm_of_a_4bit_weight_follows_a_requantized_weight():
    from lowrank_fused import dora
    w4 = params4bit()
    a, b, _ = adapters("lora_fa")
    first = dora.row_norm(w4, a, b, 2.0)
    dense = quantized.dequantize(w4, torch.float32)
    torch.testing.assert_close(first, spec.row_norm(dense, a, b.detach(), 2.0))
    other = params4bit(seed=5)  # a new quantization written into the same parameter
    w4.data, w4.quant_state = other.data, other.quant_state
    dense = quantized.dequantize(w4, torch.float32)
    torch.testing.assert_close(dora.row_norm(w4, a, b, 2.0),
                               spec.row_norm(dense, a, b.detach(), 2.0))


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_layer_dora_over_linear4bit(method):
    base = linear4bit(nn.Linear(K, N), compute_dtype=torch.float32)
    layer = lf.LowRankLinear.from_linear(base, R, method=method, dora=True,
                                         generator=torch.Generator().manual_seed(0))
    dense = quantized.dequantize(base.weight, torch.float32)
    torch.testing.assert_close(layer.magnitude.detach(), dense.norm(dim=1))  # B = 0 at init
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.1)
        layer.magnitude.mul_(1.5)
    x = torch.randn(4, K, requires_grad=True)
    y = layer(x)
    want, _ = spec.forward(x.detach(), dense, layer.lora_a.detach(), layer.lora_b.detach(),
                           bias=layer.bias.detach(), scaling=layer.scaling,
                           magnitude=layer.magnitude.detach())  # the spec, in fp32
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.magnitude.grad is not None and layer.lora_b.grad is not None
    assert (layer.lora_a.grad is not None) == (method == "lora")
    delta = layer.delta_weight()
    torch.testing.assert_close(x.detach() @ (dense + delta).T + layer.bias, y.detach(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge()


def _qdora_peft(frozen_a=False, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = quantize_model(Small(), names=["q", "v"], compute_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=8, target_modules=["q", "v"],
                                             use_dora=True, lora_dropout=dropout))
    nonzero_b(model)
    with torch.no_grad():  # magnitudes away from their init
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    if frozen_a:
        lfp.freeze_lora_a(model)
    return model


@pytest.mark.parametrize("frozen_a", [False, True])
def test_enable_fused_serves_peft_qdora_with_peft_outputs_and_grads(frozen_a):
    model = _qdora_peft(frozen_a)
    x = torch.randn(3, 5, 16)
    y0, dx0, g0 = run(model, x)
    fused = lfp.enable_fused(model)
    assert fused.served == ["base_model.model.q", "base_model.model.v"] and not fused.fallbacks
    with counting_ops() as calls:
        y1, dx1, g1 = run(model, x)
    assert len(calls) == 2
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g0) and any("lora_magnitude_vector" in n for n in g1)
    assert any("lora_A" in n for n in g1) == (not frozen_a)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_served_qdora_with_dropout_matches_peft_under_the_same_mask():
    from lowrank_fused.backends.pytorch import dropout_keep_mask
    from lowrank_fused.dropout import DropoutSpec, seed_tensor
    model = _qdora_peft(dropout=0.3)
    layer = model.base_model.model.q
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    spec = DropoutSpec(0.3, int(seed_tensor(None).item()))  # the seed the served call draws
    mask = dropout_keep_mask(spec, x.shape, x.device).float() * spec.keep_scale

    class SameMask(nn.Module):
        def forward(self, t):
            return t * mask

    real = layer.lora_dropout["default"]
    layer.lora_dropout["default"] = SameMask()
    model.base_model.model.v.lora_dropout["default"] = nn.Identity()
    model.base_model.model.v.lora_dropout["default"].training = True
    y0, dx0, g0 = run(model, x)
    layer.lora_dropout["default"] = real
    lfp.enable_fused(model)
    model.base_model.model.v.lora_dropout["default"] = nn.Dropout(0.0)  # v: no dropout either
    torch.manual_seed(7)
    y1, dx1, g1 = run(model, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
