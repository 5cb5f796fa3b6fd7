"""tools.first: its budget accounting and its incremental, kill-proof output (the whole dry
run is CI's, through tools/gpu_session.sh)."""
import json

from tools import first


def test_the_steps_fit_the_seven_minutes():
    assert sum(budget for _, budget in first.STEPS) <= first.TOTAL_BUDGET_S <= 7 * 60
    assert [step for step, _ in first.STEPS] == ["env", "correctness", "speed", "cuda"]


def test_a_step_out_of_time_is_killed_and_recorded_in_both_copies(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    # 0.4 s for all four steps: each process is killed before it has even imported torch
    rc = first.run("t", str(tmp_path / "results"), dry=True, budget_s=0.4)
    assert rc == 1
    rows = [json.loads(line) for line in (tmp_path / "results" / "t.first.jsonl").open()]
    assert (out / "t.first.jsonl").read_text() == (tmp_path / "results" / "t.first.jsonl").read_text()
    assert rows[0]["kind"] == "plan" and rows[0]["budget_s"] == 0.4
    steps = {r["step"]: r["status"] for r in rows if r.get("kind") == "step"}
    assert steps == {s: "out of time (killed)" for s, _ in first.STEPS}
    assert rows[-1]["kind"] == "summary" and rows[-1]["failed_steps"] == list(steps)


def test_work_past_the_deadline_is_skipped_not_run(tmp_path):
    sink = first.Sink([tmp_path / "x.jsonl"])
    ran = []
    assert first._timed(sink, "s", "late", deadline=0.0, fn=lambda: ran.append(1) or {"ok": True})
    assert not first._timed(sink, "s", "broken", deadline=1e12, fn=lambda: 1 / 0)
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").open()]
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


def test_a_dora_correctness_case_passes_on_the_cpu():
    # the dry run's step can run out of time before its last (DoRA) cases on a busy CPU: one of
    # them here, dropout on (both DoRA GEMMs' dual-accumulator paths)
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: interpreter
    [c] = [c for _, c in first.correctness_cases(True)
           if c["method"] == "dora" and c["dropout"] and c["base"] == torch.bfloat16]
    result = first.check_case(c, first.DRY, device, 100)
    assert result["ok"], result["failures"]
    assert "magnitude" in result["max_error"]
