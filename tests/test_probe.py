"""tools.timing (the one timer) and tools.probe's plan and CLI on the CPU (dry run: tiny
shapes, wall clock, predictions for the real shapes)."""
import json

import pytest
import torch

from tools import model, probe, timing

CPU = torch.device("cpu")


def test_spread_takes_the_20th_50th_and_80th_percentiles():
    got = timing.spread([float(v) for v in range(11)])  # 0 .. 10
    assert (got.p20, got.p50, got.p80, got.samples) == (2.0, 5.0, 8.0, 11)
    assert timing.spread([3.0]).row() == {"p20_ms": 3.0, "p50_ms": 3.0, "p80_ms": 3.0,
                                          "samples": 1}


def test_contenders_are_interleaved_round_robin_with_before_outside_each_call():
    calls = []

    def contender(name):
        return timing.Timed(lambda: calls.append(name), lambda: calls.append("before " + name))

    got = timing.interleaved({"a": contender("a"), "b": contender("b"), "c": contender("c")},
                             CPU, rounds=3, cpu_warmup_rounds=1)
    assert set(got) == {"a", "b", "c"} and all(s.samples == 3 for s in got.values())
    timed = [c for c in calls if not c.startswith("before")]
    # one warm-up round, then each round starts one contender later
    assert timed == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(calls[i] == "before " + calls[i + 1] for i in range(0, len(calls), 2))


def test_a_contender_that_raises_is_named():
    with pytest.raises(timing.ContenderError, match="broken: ZeroDivisionError") as caught:
        timing.interleaved({"fine": lambda: None, "broken": lambda: 1 / 0}, CPU, rounds=1)
    assert caught.value.contender == "broken"
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_grads_to_none_clears_tensors_and_module_parameters():
    layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2, requires_grad=True)
    layer(x).sum().backward()
    timing.grads_to_none(x, layer)()
    assert x.grad is None and all(p.grad is None for p in layer.parameters())


def test_predictions_follow_tools_model_for_every_role():
    p = probe.Probe(CPU, model.Hardware(), model.Code())
    dims = (8192, 4096, 4096, 16)
    bare = probe.predicted_s("bare", None, dims, False, p, True)
    assert bare == pytest.approx(model.predict("bare", model.Case("lora", *dims, False),
                                               p.code, p.hw, True))
    # LoRA-XS is compared with PEFT LoRA: PEFT's prediction is LoRA's
    assert probe.predicted_s("peft", "lora_xs", dims, False, p, True) == probe.predicted_s(
        "peft", "lora", dims, False, p, True)
    assert probe.predicted_s("ours", "qlora", dims, False, p, True) == pytest.approx(
        model.predict("triton", model.Case("lora", *dims, False, quant="nf4"), p.code, p.hw,
                      True))
    assert probe.predicted_s("ours", "dora_fa", dims, False, p, True) == pytest.approx(
        model.predict_dora("fused", model.Case("lora_fa", *dims, False), p.code, p.hw, True))
    assert probe.predicted_s("bare", "4bit", dims, False, p, True) is None


def test_dry_run_writes_the_groups_asked_for(tmp_path):
    out = tmp_path / "probe.json"
    result = probe.run(str(out), prefixes=["gemm", "kernels"])
    saved = json.loads(out.read_text())
    assert saved["dry_run"] is True and result["figures"] == saved["figures"]
    assert [name for name, _ in saved["plan"]] == ["gemm vs cuBLAS, copy ceiling",
                                                   "kernels 4096² r=16 lora"]
    names = [f["name"] for f in saved["figures"]]
    assert any(n.startswith("Triton fused_linear tma") for n in names)
    assert any(n.startswith("kernel grad_a dropout=on") for n in names)
    assert any(n.startswith("device-to-device copy") for n in names)
    kernels = [f for f in saved["figures"] if f["name"].startswith("kernel ")]
    assert len(kernels) == 10 and all(f["p50_ms"] > 0 and f["predicted_ms"] > 0 for f in kernels)
    assert out.stat().st_size < 100_000
