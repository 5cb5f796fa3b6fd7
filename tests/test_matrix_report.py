"""A matrix group on CPU shapes (tools.probe), its failure isolation, and the report of its rows
(python -m tools.report NAME.first.jsonl: the table and the plot)."""
import json

import pytest
import torch

from tools import first, model, probe, report

CPU = torch.device("cpu")
METHODS = ("lora", "lora_fa", "lora_xs", "dora", "qlora")


def _group(tmp_path, monkeypatch, broken=("dora", "lora_fa"), methods=METHODS):
    """One matrix point into NAME.first.jsonl, PEFT's layer raising for ``broken`` methods."""
    real_peft = probe.peft

    def peft(base, method, r, dropout):
        if method in broken:
            raise RuntimeError(f"PEFT cannot build {method} here")
        return real_peft(base, method, r, dropout)

    monkeypatch.setattr(probe, "peft", peft)
    monkeypatch.setenv(first.COMMIT_ENV, "0123abc")
    monkeypatch.setenv("LOWRANK_FUSED_AUTOTUNE", "quick")
    path = tmp_path / "t.first.jsonl"
    sink = first.Sink([path])
    p = probe.Probe(CPU, model.Hardware(), model.Code(),
                    sink=lambda row: sink(step="speed", **row))
    probe.matrix_group(p, "matrix 4096² r=16", probe.POINTS[0], methods=methods)
    return p, path, [json.loads(line) for line in path.open()]


@pytest.mark.skipif(not probe.have("peft"), reason="peft is not installed")
def test_a_peft_failure_keeps_ours_and_the_report_renders(tmp_path, monkeypatch, capsys):
    p, path, rows = _group(tmp_path, monkeypatch)
    times = [r for r in rows if r["kind"] == "time"]
    ours = {(r["method"], r["mode"]) for r in times if r["role"] == "ours"}
    assert ours == {(m, mode) for m in METHODS for mode in ("fwd", "fwd+bwd")}
    failed = {r["contender"]: r["error"] for r in rows if r["kind"] == "missing"}
    assert set(failed) == {"peft dora", "peft lora_fa"} and p.errors == 2
    assert "PEFT cannot build dora here" in failed["peft dora"]
    ratios = {(r["contender"], r["against"], r["mode"]): r for r in rows if r["kind"] == "ratio"}
    assert ("ours-triton lora", "peft lora", "fwd+bwd") in ratios
    assert ("ours-triton dora", "peft dora", "fwd+bwd") not in ratios
    xs = ratios["ours-triton lora_xs", "peft lora", "fwd+bwd"]
    assert "PEFT LoRA of the same rank" in xs["note"]
    assert ("ours-triton qlora", "bare-4bit", "fwd") in ratios
    noise = [r for r in rows if r["kind"] == "noise"]
    assert {r["mode"] for r in noise} == {"fwd", "fwd+bwd"}
    assert all(r["commit"] == "0123abc" and r["autotune"] == "quick" for r in rows)

    capsys.readouterr()
    report.main([str(path), "--markdown", str(tmp_path / "t.md")])
    text = (tmp_path / "t.md").read_text()
    assert capsys.readouterr().out.startswith(text)  # printed too
    table = text.split("## The matrix")[1].split("##")[0]
    lines = [line for line in table.splitlines() if line.startswith("| 4096² r=16")]
    assert len(lines) == 2 * len(METHODS)
    [xs_line] = [line for line in lines if "| lora_xs |" in line and "fwd+bwd" in line]
    assert "†" in xs_line
    assert "PEFT cannot build dora here" in text
    assert "commit 0123abc" in text
    png = tmp_path / "t.first.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cuda_error_ends_the_group_after_a_row_naming_the_case(tmp_path, monkeypatch):
    # on a GPU a CUDA error leaves the context broken: simulated here by the check itself
    monkeypatch.setattr(probe.Probe, "cuda_broken", lambda self, exc: True)
    with pytest.raises(probe.FatalCudaError):
        _group(tmp_path, monkeypatch, broken=("lora",), methods=("lora",))
    rows = [json.loads(line) for line in (tmp_path / "t.first.jsonl").open()]
    assert rows[-1]["kind"] == "fatal" and rows[-1]["ends_step"]
    assert rows[-1]["contender"] == "peft lora"
    # ours was built and run first: its cold calls were made before PEFT's failure
    assert not [r for r in rows if r["kind"] == "missing"]


def test_without_matplotlib_the_report_prints_its_table_and_skips_the_plot(tmp_path, monkeypatch,
                                                                          capsys):
    # a lent GPU machine may have no matplotlib: the session must not fail on the plot
    _, path, _ = _group(tmp_path, monkeypatch, broken=(), methods=("lora",))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import raises
    report.main([str(path), "--markdown", str(tmp_path / "t.md")])
    out = capsys.readouterr().out
    assert "## The matrix" in out and "plot: skipped, matplotlib is not installed" in out
    assert not (tmp_path / "t.first.png").exists()
