"""Seeing that serving is on (issue 29, item 1): ``lowrank_fused.peft.stats(model)`` counts the
operator's calls per backend and per served layer (eagerly, under torch.compile without a
recompile, under gradient checkpointing), and ``enable_fused`` logs one summary line and
prints as it."""
import logging

import pytest
import torch

pytest.importorskip("peft", reason="the peft package is not installed")
pytest.importorskip("transformers", reason="the tiny Llama needs transformers")

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import tiny_llama_peft, token_ids  # noqa: E402

LAYERS_PER_BLOCK = 7


def train_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def per_layer(stats):
    return {name: calls for name, calls in stats.layers.items()}


def test_stats_count_each_served_layer_per_backend_and_kind():
    model = tiny_llama_peft(layers=2)
    fused = lfp.enable_fused(model, backend="reference")
    ids = token_ids()
    assert lfp.stats(model).calls() == 0  # nothing before the first call
    for _ in range(2):
        train_step(model, ids)
    with torch.no_grad():
        model(input_ids=ids)
    stats = lfp.stats(model)
    assert set(stats.layers) == set(fused.served) and len(stats.layers) == 14
    assert all(calls == {"reference": {"forward": 3, "backward": 2}}
               for calls in stats.layers.values()), per_layer(stats)
    assert stats.backends == {"reference": {"forward": 42, "backward": 28}}
    assert stats.as_logs() == {"lowrank_fused/reference/backward": 28,
                               "lowrank_fused/reference/forward": 42,
                               "lowrank_fused/served_layers": 14,
                               "lowrank_fused/fallback_layers": 0}
    assert "42 forward, 28 backward, 0 recompute" in str(stats)
    lfp.reset_stats(model)
    assert lfp.stats(model).calls("forward") == 0
    train_step(model, ids)
    assert lfp.stats(model).calls("backward", backend="reference") == 14
    lfp.enable_fused(model, backend="reference")  # counts start again at enable
    assert lfp.stats(model).calls("backward") == 0


def test_stats_under_torch_compile_count_every_call_without_a_recompile():
    model = tiny_llama_peft(layers=1)
    lfp.enable_fused(model, backend="reference")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    ids = token_ids()
    try:
        want = train_step(model, ids)  # eager first: the counts do not depend on the mode
        got = [train_step(compiled, ids) for _ in range(3)]
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1  # one graph, traced once: counting added no guard
    torch.testing.assert_close(got[0], want)
    stats = lfp.stats(model)
    assert stats.backends == {"reference": {"forward": 4 * LAYERS_PER_BLOCK,
                                            "backward": 4 * LAYERS_PER_BLOCK}}
    assert all(calls["reference"] == {"forward": 4, "backward": 4}
               for calls in stats.layers.values()), per_layer(stats)


def test_stats_under_gradient_checkpointing_count_the_recompute_apart():
    model = tiny_llama_peft(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lfp.enable_fused(model, backend="reference")
    train_step(model, token_ids())
    stats = lfp.stats(model)
    assert len(stats.layers) == 14
    assert all(calls == {"reference": {"forward": 1, "recompute": 1, "backward": 1}}
               for calls in stats.layers.values()), per_layer(stats)
    assert stats.as_logs()["lowrank_fused/reference/recompute"] == 14


def test_enable_fused_logs_one_line_and_prints_as_it(caplog):
    model = tiny_llama_peft(layers=2)
    with caplog.at_level(logging.INFO, logger="lowrank_fused.peft"):
        fused = lfp.enable_fused(model)
    line = "14/14 LoRA layers served, backend auto → reference on cpu, 0 fallbacks"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == \
        [("INFO", "lowrank_fused: " + line)]
    assert str(fused) == line and repr(fused) == f"FusedPeft({line})"
    assert len(fused.served) == 14 and fused.layers == 14 and not fused.fallbacks
    assert fused.backends == {"cpu": "reference"}
    assert fused.stats().calls() == 0
