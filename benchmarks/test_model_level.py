"""Model-level suite: plain PEFT against ``enable_fused`` on a Llama-style decoder and a
BERT-style encoder built from transformers configs (random weights), for LoRA, LoRA-FA and
LoRA-XS, lora_dropout 0 and 0.05, fp32 and bf16 bases (fp32 adapters). Each case's figures
(saved-activation bytes, CUDA peak memory, training-step time, agreement with PEFT) are in its
``extra_info``; see tools/model_level.py. Shapes: ``LOWRANK_MODEL_BENCH=ci|reference|compass|tiny`` (default
compass on a GPU, ci on a CPU)::

    LOWRANK_MODEL_BENCH=reference python -m pytest benchmarks/test_model_level.py \
        --benchmark-json=benchmarks/results/cpu-model.json
"""
import pytest

from benchmarks.conftest import DEVICE
from tools.layers import peft_available
from tools.model_level import cases, preset, run_case, tolerance

pytestmark = pytest.mark.skipif(not peft_available(), reason="needs peft")

PRESET = preset()


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_model_level(benchmark, case):
    info = run_case(case, DEVICE, warmup=PRESET.warmup, repeats=PRESET.repeats,
                    threads=PRESET.threads)
    benchmark.group = f"model {case.arch} {case.dtype}"
    benchmark.extra_info.update(info)
    # the figures are in extra_info; pytest-benchmark's own timer has nothing to time
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert info["contenders"]["fused"]["fallback_layers"] == 0  # every adapted layer is ours
    for name, figures in info["contenders"].items():
        assert figures["saved_bytes"] > 0, name
        # the frozen model's own activations are a floor no contender goes below
        assert 0 < info["frozen_model_bytes"] <= figures["saved_bytes"], name
        assert figures["step_ms"] > 0, name
    if case.setup == "lora_fa" and case.dropout > 0:  # x is never kept, the mask not either
        assert info["saved_bytes_fused_over_peft"] < 1
    if case.dropout == 0:
        assert info["loss_rel_diff_fused"] <= tolerance(case), info["loss_rel_diff_fused"]
        assert info["grad_rel_diff_fused"] <= tolerance(case), info["grad_rel_diff_fused"]
