"""Fallbacks said early and once (issue 29, item 2): every reason the config decides is found by
``enable_fused`` and listed in ``fallbacks`` before any call (no warning per layer per call
after); what only a call can show is said once per reason with the count of layers;
``strict=True`` raises listing every layer and leaves the model as it was."""
import copy
import logging
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the peft package is not installed")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from lowrank_fused import stats as operator_stats  # noqa: E402
from peft_helpers import Small, nonzero_b, small_peft, tiny_llama_peft, token_ids  # noqa: E402

QV = ("base_model.model.q", "base_model.model.v")


def _second_adapter(model, **config):
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], **config))
    nonzero_b(model)
    model.base_model.set_adapter(["default", "other"])
    return model


def _bf16_other(model):
    for name, p in model.named_parameters():
        if ".other." in name:
            p.data = p.data.to(torch.bfloat16)
    return model


def _dora_magnitude_in_bf16(model):
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data = p.data.to(torch.bfloat16)
    return model


def _gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    class WithConv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Conv1D(24, 16)  # GPT-2's layer: weight (in, out), PEFT's fan_in_fan_out
            self.v = nn.Linear(24, 4)

        def forward(self, x):
            return self.v(self.q(x))

    torch.manual_seed(0)
    return get_peft_model(WithConv1D(), LoraConfig(r=4, target_modules=["q"],
                                                   fan_in_fan_out=True))


def _quiet(build, **config):
    with warnings.catch_warnings():  # "aLoRA is currently only supported for CAUSAL_LM task"
        warnings.simplefilter("ignore")
        return build(**config)


# name -> (model builder, {layer: reason} that enable_fused must list)
CONFIGS = {
    "lora_bias": (lambda: small_peft(lora_bias=True),
                  dict.fromkeys(QV, "adapter 'default' has a LoRA bias")),
    "variant": (lambda: _quiet(small_peft, alora_invocation_tokens=[1, 2]),
                dict.fromkeys(QV, "adapter 'default' is a ALoraLinearVariant")),
    "fan_in_fan_out": (_gpt2_conv1d,
                       {"base_model.model.q": "base layer Conv1D is not a plain nn.Linear"}),
    "adapter_dtypes": (lambda: _bf16_other(_second_adapter(small_peft())),
                       dict.fromkeys(QV, "active adapters of different dtypes")),
    "dora_several_adapters": (lambda: _second_adapter(small_peft(use_dora=True), use_dora=True),
                              dict.fromkeys(QV, "several active adapters with DoRA")),
    "dropout_several_adapters": (
        lambda: _second_adapter(small_peft(lora_dropout=0.1)),
        dict.fromkeys(QV, "several active adapters with dropout (each draws its own mask in "
                          "training)")),
    "dora_magnitude_dtype": (lambda: _dora_magnitude_in_bf16(small_peft(use_dora=True)),
                             dict.fromkeys(QV, "a DoRA magnitude of another dtype than its "
                                               "adapters")),
    "dora_dropout_one": (lambda: small_peft(use_dora=True, lora_dropout=1.0),
                         dict.fromkeys(QV, "DoRA with lora_dropout=1.0 (in training)")),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_config_decided_fallback_is_listed_at_enable_and_never_warned_per_call(config,
                                                                                  caplog):
    build, want = CONFIGS[config]
    model = build()
    model.eval()  # listed even in eval: a model is usually enabled before it trains
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.INFO, logger="lowrank_fused.peft"):
        fused = lfp.enable_fused(model, backend="reference")
    assert fused.fallbacks == want
    assert sorted(fused.served + list(fused.fallbacks)) == sorted(
        name for name, m in model.named_modules() if hasattr(m, "lora_A"))
    n = len(want)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert f"{n} fallback" in caplog.text and f"{n} × {next(iter(want.values()))}" in caplog.text
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            y = model(x)
    assert not [w for w in caught if "lowrank_fused" in str(w.message)]
    if config != "dropout_several_adapters" and config != "dora_dropout_one":
        torch.testing.assert_close(y, expected)  # PEFT's own forward gives PEFT's numbers


def test_a_lora_bias_model_says_it_once_not_once_per_layer_per_call():
    # the case: 14 warnings on the first forward, never summarised, fallbacks empty
    model = tiny_llama_peft(layers=2, lora_bias=True)
    fused = lfp.enable_fused(model)
    assert not fused.served and len(fused.fallbacks) == 14
    assert str(fused) == ("0/14 LoRA layers served, backend auto → reference on cpu, "
                          "14 fallbacks (14 × adapter 'default' has a LoRA bias)")
    ids = token_ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in caught if "lowrank_fused" in str(w.message)]
    assert lfp.stats(model).calls() == 0 and len(lfp.stats(model).fallbacks) == 14


def _state(model):
    """Everything enable_fused may change: classes, hooks, instance dicts' keys, counts."""
    return ([type(m) for m in model.modules()],
            [dict(m._forward_pre_hooks) for m in model.modules()],
            [dict(m._forward_hooks) for m in model.modules()],
            [sorted(m.__dict__) for m in model.modules()],
            copy.deepcopy(operator_stats.snapshot()))


def test_strict_raises_listing_every_layer_and_changes_nothing():
    model = _second_adapter(small_peft(use_dora=True), use_dora=True)
    before = _state(model)
    with pytest.raises(ValueError) as err:
        lfp.enable_fused(model, strict=True)
    message = str(err.value)
    assert "2 of 2 LoRA layers" in message and "the model was not changed" in message
    for name in QV:
        assert f"{name}: several active adapters with DoRA" in message
    assert _state(model) == before
    # enabled before (not strict), a strict call that fails leaves that as it was too
    lfp.enable_fused(model)
    before = _state(model)
    with pytest.raises(ValueError, match="several active adapters with DoRA"):
        lfp.enable_fused(model, strict=True)
    assert _state(model) == before


def test_strict_passes_when_every_layer_is_served():
    model = small_peft()
    fused = lfp.enable_fused(model, strict=True)
    assert fused.served == list(QV) and not fused.fallbacks


def test_a_reason_only_a_call_shows_is_said_once_with_the_count_of_layers():
    model = small_peft(use_dora=True)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                          use_dora=True))
    fused = lfp.enable_fused(model, backend="reference")
    assert fused.served == list(QV)
    model.base_model.set_adapter(["default", "other"])  # after enable: only a call shows it
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(x)
    said = [str(w.message) for w in caught if "lowrank_fused" in str(w.message)]
    assert said == ["lowrank_fused: 2 LoRA layers run PEFT's own forward: several active "
                    "adapters with DoRA (base_model.model.q, base_model.model.v)"]
    assert fused.fallbacks == dict.fromkeys(QV, "several active adapters with DoRA")
    assert not fused.served


def test_a_mixed_adapter_batch_is_said_once():
    model = _second_adapter(small_peft())
    model.base_model.set_adapter("default")
    model.eval()  # PEFT takes adapter_names in eval only
    fused = lfp.enable_fused(model, backend="reference")
    assert fused.served == list(QV)
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(x, adapter_names=["default", "other", "__base__", "other"])
    said = [str(w.message) for w in caught if "lowrank_fused" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("lowrank_fused: 2 LoRA layers run PEFT's own "
                                                 "forward: a call with extra arguments")


def test_layers_that_are_not_linear_are_listed_at_enable():
    class WithEmbedding(Small):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)

        def forward(self, ids):
            return super().forward(self.emb(ids))

    model = get_peft_model(WithEmbedding(), LoraConfig(r=2, target_modules=["q", "emb"]))
    fused = lfp.enable_fused(model)
    assert fused.served == ["base_model.model.q"]
    assert fused.fallbacks == {"base_model.model.emb": "Embedding layers are not Linear"}
    assert str(fused).startswith("1/2 LoRA layers served")


def test_a_backend_that_cannot_run_is_refused_before_anything_changes(monkeypatch):
    from lowrank_fused import BackendUnavailableError, dispatch

    model = small_peft()
    before = _state(model)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        lfp.enable_fused(model, backend="nope")
    assert _state(model) == before
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="triton"):
        lfp.enable_fused(model, backend="triton")
    assert _state(model) == before
