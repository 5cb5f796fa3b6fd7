"""The model-level benchmark's core (tools/model_level.py) on tiny Llama and BERT configs:
figures are sane, fused keeps no more than PEFT where it must keep less, losses and gradients
agree with dropout off, and the report turns the figures into the README's table."""
import dataclasses
import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from tools import model_level, report  # noqa: E402
from tests.peft_helpers import counting_ops  # noqa: E402

TINY = model_level.PRESETS["tiny"].shapes


def case(arch, setup, dtype="float32", dropout=0.0):
    return model_level.Case(arch, setup, dtype, dropout, TINY[arch])


def run(c):
    return model_level.run_case(c, "cpu", warmup=0, repeats=1, threads=1)


@pytest.mark.parametrize("arch", list(model_level.ARCHS))
@pytest.mark.parametrize("setup", [s for s in model_level.SETUPS
                                   if not model_level.SETUPS[s].four_bit
                                   or model_level.bitsandbytes_available()])
def test_agrees_with_peft_without_dropout(arch, setup):
    c = case(arch, setup)
    with counting_ops() as calls:
        info = run(c)
    # every targeted layer of the fused contender ran our operator: the measured forward and
    # one timed step (warmup 0, repeats 1); PEFT's contender never calls it
    layers = sum(1 for _ in model_level.build(c, "cpu").named_modules()
                 if type(_[1]).__name__ in ("Linear", "Linear4bit") and hasattr(_[1], "lora_A"))
    assert layers > 0 and len(calls) == 2 * layers
    for name, figures in info["contenders"].items():
        assert figures["saved_bytes"] > 0 and figures["step_ms"] > 0, name
        assert figures["peak_bytes"] is None and figures["trainable"] > 0, name
        # the frozen model's own activations: a floor under every contender, not zero
        assert 0 < info["frozen_model_bytes"] <= figures["saved_bytes"], name
    assert info["contenders"]["fused"]["trainable"] == info["contenders"]["peft"]["trainable"]
    assert info["contenders"]["fused"]["served_layers"] == layers
    assert info["contenders"]["fused"]["fallback_layers"] == 0
    assert info["loss_rel_diff_fused"] <= model_level.tolerance(c)
    assert info["grad_rel_diff_fused"] <= model_level.tolerance(c)
    json.dumps(info)  # JSON-ready, as pytest-benchmark's extra_info must be


def test_bf16_base_agrees_and_keeps_less():
    c = case("llama", "lora", "bfloat16")
    info = run(c)
    assert info["grad_rel_diff_fused"] <= model_level.tolerance(c)
    # PEFT keeps x cast to the fp32 adapters' dtype for lora_A's gradient; we do not
    assert info["saved_bytes_fused_over_peft"] < 1


@pytest.mark.parametrize("arch", list(model_level.ARCHS))
def test_lora_fa_with_dropout_keeps_less_than_peft(arch):
    info = run(case(arch, "lora_fa", dropout=0.05))
    figures = info["contenders"]
    assert 0 < figures["fused"]["saved_bytes"] < figures["peft"]["saved_bytes"]
    # PEFT adds a mask and a dropped copy of x per layer over the frozen model; we add P
    assert 0 < info["added_bytes_fused_over_peft"] < 0.5
    assert info["loss_rel_diff_fused"] is None  # the masks differ by design


def test_cases_cover_the_grid():
    ids = {c.id for c in model_level.cases("ci")}
    assert len(ids) == 2 * 5 * 2 * 2
    assert "llama-lora_fa-bfloat16-p0.05" in ids and "bert-lora_xs-float32-p0" in ids
    assert "llama-dora-float32-p0" in ids and "bert-dora_fa-bfloat16-p0.05" in ids
    assert model_level.preset("reference").threads == 1
    with pytest.raises(ValueError, match="expected one of"):
        model_level.preset("nope")


def test_report_table_and_readme(tmp_path):
    info = run(case("llama", "lora_fa", dropout=0.05))
    xs = run(dataclasses.replace(case("bert", "lora_xs")))
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"benchmarks": [{"extra_info": info}, {"extra_info": xs}]}))
    _, infos = report.load(results)
    table = report.model_table(infos)
    assert table.count("\n") == 3 and "lora_fa" in table and "n/a (dropout)" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.START}\nkept\n{report.END}\n"
                      f"{report.MODEL_START}\nold\n{report.MODEL_END}\nb\n")
    report.main([str(results), "--markdown", str(tmp_path / "r.md"), "--readme", str(readme),
                 "--model-plot", str(tmp_path / "m.png"), "--plot", str(tmp_path / "p.png")])
    text = readme.read_text()
    assert "kept" in text and "old" not in text and "| llama | lora_fa |" in text
    assert "Whole models" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "m.png").stat().st_size > 0 and not (tmp_path / "p.png").exists()


def test_report_writes_each_table_where_its_markers_are(tmp_path):
    # the README holds the headline table's markers, docs/benchmarks.md the model-level one's
    info = run(case("llama", "lora_fa"))
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"benchmarks": [{"extra_info": info}]}))
    readme, page = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(f"a\n{report.START}\nkept\n{report.END}\n")
    page.write_text(f"b\n{report.MODEL_START}\nold\n{report.MODEL_END}\n")
    report.main([str(results), "--markdown", str(tmp_path / "r.md"),
                 "--readme", str(readme), "--readme", str(page)])
    assert readme.read_text() == f"a\n{report.START}\nkept\n{report.END}\n"
    assert "old" not in page.read_text() and "| llama | lora_fa |" in page.read_text()
    with pytest.raises(SystemExit, match="model-results"):  # no file has its markers
        report.main([str(results), "--markdown", str(tmp_path / "r.md"), "--readme", str(readme)])
    assert readme.read_text() == f"a\n{report.START}\nkept\n{report.END}\n"  # nothing written
