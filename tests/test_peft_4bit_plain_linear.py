"""PEFT's plain ``lora.Linear`` around a bitsandbytes ``Linear4bit`` (a model PEFT did not see
marked ``is_loaded_in_4bit``: assembled by hand, or quantized after loading) is served as its
4-bit class is (issue 29, item 4), with PEFT's outputs and gradients."""
import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the peft package is not installed")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import Small, nonzero_b  # noqa: E402
from qlora_helpers import quantize_model  # noqa: E402


def run(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def compare(model, x, tol):
    want = run(model, x)
    fused = lfp.enable_fused(model, backend="reference")
    layers = [n for n, m in model.named_modules() if type(m) is lfp.FusedLoraLinear]
    assert fused.served == layers and layers and not fused.fallbacks
    got = run(model, x)
    stats = lfp.stats(model)
    assert all(calls == {"reference": {"forward": 1, "backward": 1}}
               for calls in stats.layers.values()), stats.layers
    for w, g in zip(want[:2], got[:2]):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert set(got[2]) == set(want[2]) and any("lora_B" in n for n in want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=tol, atol=tol, msg=name)
    fused.disable()
    assert not any(type(m) is lfp.FusedLoraLinear for m in model.modules())


def _repro():
    torch.manual_seed(0)
    return get_peft_model(nn.Sequential(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)),
                          LoraConfig(target_modules=["0"]))


def test_the_issue_repro_is_served_with_peft_outputs_and_gradients():
    model = _repro().to("cpu")  # .to() quantizes (before, neither PEFT nor we can run it)
    assert type(model.base_model.model[0]) is LoraLinear  # PEFT's plain class, 4-bit base
    nonzero_b(model)
    compare(model, torch.randn(5, 64), 1e-5)


def test_a_4bit_base_not_quantized_yet_is_listed_with_the_reason():
    fused = lfp.enable_fused(_repro())
    assert fused.fallbacks == {"base_model.model.0": "its 4-bit base weight has no quant_state "
                                                    "yet (move the model to its device)"}


def _hand_quantized(compute_dtype=torch.float32, **config):
    torch.manual_seed(0)
    base = quantize_model(Small(), names=["q", "v"], compute_dtype=compute_dtype)
    del base.is_loaded_in_4bit  # as if quantized after loading: PEFT builds lora.Linear
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                            **config))
    assert type(model.base_model.model.q) is LoraLinear
    nonzero_b(model)
    return model


@pytest.mark.parametrize("method", ["lora", "lora_fa", "dora"])
def test_a_hand_quantized_model_is_served_with_peft_outputs_and_gradients(method):
    model = _hand_quantized(use_dora=method == "dora")
    if method == "lora_fa":
        lfp.freeze_lora_a(model)
    compare(model, torch.randn(3, 5, 16), 1e-5)


def test_bf16_compute_over_an_fp32_model():
    # bitsandbytes rounds the base output to bf16 in both; the adapters' input differs by one
    # bf16 rounding (the operator reads the cast x, PEFT's plain Linear the fp32 x)
    model = _hand_quantized(compute_dtype=torch.bfloat16)
    compare(model, torch.randn(3, 5, 16), 2e-2)
