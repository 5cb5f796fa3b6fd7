"""tools.first: its budget accounting, its kill-proof output, what every row carries, and a run
from a copy of the tree without peft, bitsandbytes and transformers (CI runs the whole dry run
through tools/gpu_session.sh)."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tools import first, prepare_bitsandbytes, probe

ROOT = first.ROOT


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_the_steps_and_the_speed_plan_fit_the_budget():
    assert sum(budget for _, budget in first.STEPS) <= first.TOTAL_BUDGET_S <= 420
    assert [step for step, _ in first.STEPS] == ["env", "correctness", "speed", "cuda"]
    plan = first.plan_row(first.budgets_for(), dry=False, prefixes=None)
    assert plan["fits"]
    order = [g["group"] for g in plan["speed_plan"]]
    # the matrix first, the four points in the order, then calibration
    assert order[:5] == ["matrix 4096² r=16", "matrix 4096→11008 r=16", "matrix 4096² r=64",
                         "matrix 4096→11008 r=64", "calibration full/quick 4096² r=16 lora_fa"]
    # every group fits but the last, the cold/warm first step under full autotuning, which a
    # later call runs (--resume --groups llama)
    assert order[-1] == probe.FIRST_STEP_GROUP
    assert all(g["fits"] for g in plan["speed_plan"][:-1]), plan["speed_plan"]


def _fake_steps(monkeypatch, script):
    """Each step runs ``script`` (argv: results, name, step) instead of tools.first --step."""
    monkeypatch.setattr(first, "step_command", lambda name, results, step, deadline, dry,
                        prefixes: [sys.executable, "-c", script, results, name, step])


SINK = "import sys, time\nfrom tools.first import Sink, _sink_paths\n" \
       "sink = Sink(_sink_paths(sys.argv[1], sys.argv[2]))\n"


def test_a_killed_step_keeps_its_rows_in_both_copies(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    _fake_steps(monkeypatch, SINK + textwrap.dedent("""\
        sink(step=sys.argv[3], kind="figure", n=1)
        sink(step=sys.argv[3], kind="figure", n=2)
        sink(step=sys.argv[3], kind="group", group="g1", status="started")
        time.sleep(120)  # past any budget here: the driver kills it
        """))
    rc = first.run("t", str(tmp_path / "results"), dry=True, budget_s=6, steps=["speed"])
    assert rc == 1
    path = tmp_path / "results" / "t.first.jsonl"
    assert (out / "t.first.jsonl").read_text() == path.read_text()
    rows = _rows(path)
    assert rows[0]["kind"] == "plan" and rows[0]["budget_s"] == 6
    assert [r["n"] for r in rows if r.get("kind") == "figure"] == [1, 2]
    [step] = [r for r in rows if r.get("kind") == "step"]
    assert step["status"] == "out of time (killed)" and step["seconds"] < 30
    assert rows[-1]["kind"] == "summary" and rows[-1]["failed_steps"] == ["speed"]
    # the group it was killed in is closed as such: a --resume runs it again
    assert [r["status"] for r in rows if r.get("group") == "g1"] == [
        "started", "killed at the step's deadline"]
    assert first.died_in(rows, "speed", "group") == [] and first.groups_done(rows) == set()


def test_a_step_ended_by_a_cuda_error_starts_again_with_what_is_left(tmp_path, monkeypatch):
    marker = tmp_path / "first-attempt"
    _fake_steps(monkeypatch, SINK + textwrap.dedent(f"""\
        import os
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            sink(step=sys.argv[3], name="case 1", ok=False, cuda_error=True, ends_step=True)
            sys.exit({first.CUDA_ERROR_RC})
        sink(step=sys.argv[3], name="case 2", ok=True)
        """))
    rc = first.run("t", str(tmp_path), dry=True, steps=["correctness"])
    rows = _rows(tmp_path / "t.first.jsonl")
    assert rc == 0
    assert [r["name"] for r in rows if "name" in r] == ["case 1", "case 2"]
    assert [r for r in rows if r.get("kind") == "restart"][0]["attempt"] == 2
    [step] = [r for r in rows if r.get("kind") == "step"]
    assert step["status"] == "done" and step["restarts"] == 1


def test_a_step_killed_by_a_signal_starts_again_and_its_group_is_named(tmp_path, monkeypatch):
    marker = tmp_path / "first-attempt"
    _fake_steps(monkeypatch, SINK + textwrap.dedent(f"""\
        import os, signal
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            sink(step=sys.argv[3], kind="group", group="g1", status="started")
            sink(step=sys.argv[3], kind="time", group="g1", p50_ms=1.0)  # its rows so far stay
            os.kill(os.getpid(), signal.SIGKILL)  # as a crash in a kernel would end it
        sink(step=sys.argv[3], kind="group", group="g2", status="done")
        """))
    assert first.run("t", str(tmp_path), dry=True, steps=["speed"]) == 0
    rows = _rows(tmp_path / "t.first.jsonl")
    [restart] = [r for r in rows if r.get("kind") == "restart"]
    assert restart["after"] == f"signal {int(__import__('signal').SIGKILL)}"
    # what the restarted speed step records, and then skips
    assert first.died_in(rows, "speed", "group") == ["g1"]
    assert first.groups_done(rows) == {"g2"}


def test_every_row_carries_the_commit_and_its_autotune_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(first.COMMIT_ENV, "abc123")
    monkeypatch.setenv("LOWRANK_FUSED_AUTOTUNE", "quick")
    sink = first.Sink([tmp_path / "x.jsonl"])
    sink(step="s", kind="time")
    sink(step="s", kind="time", autotune="full")  # a row that ran under another mode says so
    monkeypatch.delenv("LOWRANK_FUSED_AUTOTUNE")
    sink(step="s", kind="time")
    rows = _rows(tmp_path / "x.jsonl")
    assert [r["commit"] for r in rows] == ["abc123"] * 3
    assert [r["autotune"] for r in rows] == ["quick", "full", "full"]


def test_work_past_the_deadline_is_skipped_not_run(tmp_path):
    sink = first.Sink([tmp_path / "x.jsonl"])
    ran = []
    assert first._timed(sink, "s", "late", deadline=0.0, fn=lambda: ran.append(1) or {"ok": True})
    assert not first._timed(sink, "s", "broken", deadline=1e12, fn=lambda: 1 / 0)
    rows = _rows(tmp_path / "x.jsonl")
    assert ran == [] and rows[0]["skipped"] == "out of time"
    assert rows[1]["ok"] is False and "ZeroDivisionError" in rows[1]["error"]


def test_a_copy_left_behind_by_a_kill_is_brought_level(tmp_path):
    sink = first.Sink([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    sink(step="s", n=1)
    with open(sink.paths[0], "a") as f:  # what a kill between the two writes leaves
        f.write('{"step": "s", "n": 2}\n')
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "b.jsonl").read_text()
    sink.sync()
    sink(step="s", n=3)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert [json.loads(line)["n"] for line in (tmp_path / "b.jsonl").open()] == [1, 2, 3]


def test_the_correctness_cases_cover_every_family_at_r64_and_the_h200_case():
    import torch
    cases = [c for _, c in first.correctness_cases(False)]
    r64 = {(c["method"], bool(c.get("quant"))) for c in cases if c.get("rank") == 64}
    assert r64 == {("lora", False), ("lora_fa", False), ("lora_xs", False), ("dora", False),
                   ("dora_fa", False), ("lora", True)}
    assert all(c["dropout"] and c["adapter"] == torch.float32 for c in cases if "rank" in c)
    fp32 = [i for i, c in enumerate(cases) if c["base"] == torch.float32]
    dora = [i for i, c in enumerate(cases) if c["method"].startswith("dora")
            and c["base"] == torch.bfloat16]
    assert max(dora) < min(fp32)  # DoRA ahead of the fp32 cases
    assert any(c.get("shape") == first.H200_XS_SHAPE and c["method"] == "lora_xs" for c in cases)


def test_a_dora_correctness_case_passes_on_the_cpu():
    # the dry run's step can run out of time before its last (DoRA) cases on a busy CPU: one of
    # them here, dropout on (both DoRA GEMMs' dual-accumulator paths)
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: interpreter
    [c] = [c for _, c in first.correctness_cases(True)
           if c["method"] == "dora" and c["dropout"] and c["base"] == torch.bfloat16
           and "rank" not in c]
    result = first.check_case(c, first.DRY, device, 100)
    assert result["ok"], result["failures"]
    assert "magnitude" in result["max_error"]


BLOCKED = ("peft", "bitsandbytes", "transformers")


def _tree_copy(dest):
    """The files that travel to a lent machine: tracked and untracked-not-ignored ones."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def test_first_runs_from_a_copy_of_the_tree_without_peft_or_bitsandbytes(tmp_path):
    tree, blocker, results = tmp_path / "tree", tmp_path / "blocker", tmp_path / "results"
    _tree_copy(tree)
    blocker.mkdir()
    # as if never installed: import raises ModuleNotFoundError, find_spec answers None
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in BLOCKED))
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(blocker)
    done = subprocess.run(
        [sys.executable, "-m", "tools.first", "bare", "--results", str(results), "--dry-run",
         "--steps", "env,speed", "--groups", "matrix 4096² r=16,llama,model"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(results / "bare.first.jsonl")
    [env_row] = [r for r in rows if r.get("kind") == "env"]
    assert env_row["lowrank_fused"].startswith(str(tree))  # the copy's package, uninstalled
    assert env_row["importable"] == {n: False for n in BLOCKED}
    ours = {(r["method"], r["mode"]) for r in rows
            if r.get("kind") == "time" and r.get("role") == "ours"}
    assert ours == {(m, mode) for m in ("lora", "lora_fa", "lora_xs", "dora", "dora_fa")
                    for mode in ("fwd", "fwd+bwd")}
    missing = {r["contender"]: r["skipped"] for r in rows if r.get("kind") == "missing"
               and "contender" in r}
    assert missing["peft lora"] == "peft is not installed"
    assert missing["ours-triton qlora"] == "bitsandbytes is not installed"
    assert missing["bare-4bit"] == "bitsandbytes is not installed"
    [cold] = [r for r in rows if r.get("name") == "first training step, cold"]
    assert cold["model"].startswith("LowRankLinear stack")  # transformers not importable
    [warm] = [r for r in rows if r.get("name") == "first training step, warm"]
    assert warm["timed"] == {"configs benchmarked": 0, "variant timings": 0, "backend keys": 0}
    assert any(r.get("kind") == "missing" and "peft" in r.get("skipped", "")
               and r["group"].startswith("model bert") for r in rows)


def _bnb_version():
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_bnb_version() != prepare_bitsandbytes.VERSION,
                    reason=f"bitsandbytes {prepare_bitsandbytes.VERSION} is not installed")
def test_the_slimmed_bitsandbytes_keeps_the_cuda_13_and_cpu_libraries_only(tmp_path):
    out = tmp_path / ".carry"
    info = prepare_bitsandbytes.prepare(str(out), "130")
    native = sorted(p.name for p in (out / "bitsandbytes").glob("libbitsandbytes_*"))
    assert native == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]
    assert info["bytes"] < 8 * 2**20
    metadata = (out / f"bitsandbytes-{prepare_bitsandbytes.VERSION}.dist-info" / "METADATA")
    assert f"Version: {prepare_bitsandbytes.VERSION}" in metadata.read_text()
    assert not list(out.rglob("__pycache__"))
    # a CUDA library the source lacks: a clear error, and the earlier copy stays as it was
    with pytest.raises(prepare_bitsandbytes.PrepareError, match="lacks libbitsandbytes_cuda999"):
        prepare_bitsandbytes.prepare(str(out), "999")
    assert sorted(p.name for p in (out / "bitsandbytes").glob("libbitsandbytes_*")) == native
