"""lowrank_fused.tuning (issue 30): the timed choice between the fused backends and the
reference, its local cache, the shipped table, the report, and the rules under graph capture and
tracing. Timings are injected (a fake clock the contenders advance); the cache is a temporary
directory; the GPU is described by a hand-written Environment."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from lowrank_fused import tuning
from lowrank_fused.tuning import TuningCacheWarning, TuningKey, Tuner
from lowrank_fused.tuning.environment import Environment, gpu_model
from lowrank_fused.tuning.schema import CACHE_SCHEMA, check_cache, check_table
from lowrank_fused.tuning.shipped import DEFAULT_PATH
from lowrank_fused.tuning.timing import ClockTimer

ROOT = Path(__file__).resolve().parents[1]
H100 = Environment("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", "12.4", "2.11.0", "3.6.0",
                   "0.1.0", "0123456789abcdef")


class FakeClock:
    """A clock that only the contenders move: each adds its injected cost per call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def contenders(clock: FakeClock, costs_ms: dict, calls: list) -> dict:
    def runner(name, ms):
        def run():
            calls.append(name)
            clock.now += ms / 1e3
        return run
    return {name: runner(name, ms) for name, ms in costs_ms.items()}


def key(op="forward", m=8000, n=4096, k=4096, r=16, method="lora_fa", flags=("bias",)):
    return TuningKey.of(op, torch.bfloat16, torch.float32, method, m, n, k, r, flags)


def never_time(fn):
    raise AssertionError("timed although a decision was recorded")


@pytest.fixture
def empty_table(tmp_path) -> Path:
    path = tmp_path / "table.json"
    path.write_text(DEFAULT_PATH.read_text())
    return path


@pytest.fixture
def make_tuner(tmp_path, empty_table):
    clock = FakeClock()

    def make(cache=tmp_path / "cache", table=empty_table, environment=H100, timer=None):
        return Tuner(cache_dir=cache, table=table, environment=environment,
                     timer=timer or ClockTimer(clock, reps=3))
    make.clock = clock
    return make


# -- the choice ------------------------------------------------------------------------------

def test_reference_wins_when_faster_and_fused_when_it_is_forward_and_backward_apart(make_tuner):
    """Same shape, two passes: the reference is faster forward, Triton backward; each pass
    keeps its own winner, and every contender ran (once to warm up, then timed)."""
    tuner, calls = make_tuner(), []
    forward, backward = key("forward"), key("backward")
    assert tuner.decide(forward, contenders(make_tuner.clock, {"triton": 2.0, "reference": 1.5},
                                            calls)) == "reference"
    assert tuner.decide(backward, contenders(make_tuner.clock, {"triton": 3.0, "reference": 4.0},
                                             calls)) == "triton"
    assert calls.count("triton") == calls.count("reference") == 2 * (1 + 3)
    rows = {row["key"]: row for row in tuner.report()}
    assert rows[forward.id]["times_ms"] == {"triton": 2.0, "reference": 1.5}
    assert rows[backward.id]["times_ms"] == {"triton": 3.0, "reference": 4.0}
    assert {row["source"] for row in rows.values()} == {"timed now"}
    # decided once: a second call times nothing
    calls.clear()
    assert tuner.decide(forward, contenders(make_tuner.clock, {"triton": 0.1, "reference": 9.0},
                                            calls)) == "reference"
    assert calls == []


def test_three_contenders_and_a_failing_one(make_tuner):
    """The CUDA extension competes where built; a contender that raises is left out with a
    warning and recorded as failed (None)."""
    tuner, calls = make_tuner(), []
    runs = contenders(make_tuner.clock, {"triton": 2.0, "cuda": 1.0, "reference": 3.0}, calls)
    assert tuner.decide(key(), runs) == "cuda"

    def broken():
        raise RuntimeError("out of shared memory")
    runs = dict(contenders(make_tuner.clock, {"triton": 2.0, "reference": 3.0}, calls),
                cuda=broken)
    with pytest.warns(RuntimeWarning, match="backend 'cuda' failed"):
        assert tuner.decide(key(m=100), runs) == "triton"
    assert tuner.report()[-1]["times_ms"] == {"triton": 2.0, "reference": 3.0, "cuda": None}


def test_bad_contenders_are_refused(make_tuner):
    with pytest.raises(ValueError, match="contenders"):
        make_tuner().decide(key(), {"tma": lambda: None})
    with pytest.raises(ValueError, match="default"):
        make_tuner().decide(key(), {"triton": lambda: None}, default="reference")


def test_outputs_and_saved_bytes_are_the_same_whichever_wins(make_tuner, tmp_path):
    """The decision only changes who computes: injected timings make the reference win one
    key and Triton the other (the Triton interpreter on this CPU); running the operator with
    each winner gives y and every gradient within the kernel tolerance of each other, and
    autograd saves the same tensors (LoRA-FA with dropout: P and a seed, never x)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs the Triton interpreter (CPU tensors)")
    from lowrank_fused import low_rank_linear
    from lowrank_fused.saved_activations import SavedActivations
    from tests.helpers import TRAINABLE, make_case
    from tests.tolerance import assert_kernel_close

    case = make_case((48,), 64, 40, 8, trainable=TRAINABLE["lora_fa"], dtype=torch.float32)
    grad_y = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))

    def run(backend):
        leaves = {n: t.detach().clone().requires_grad_(t.requires_grad)
                  for n, t in case.tensors().items()}
        with SavedActivations() as saved:
            y = low_rank_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                                bias=leaves["bias"], scaling=case.scaling, dropout_p=0.1,
                                dropout_seed=1234, backend=backend)
        y.backward(grad_y)
        grads = {n: t.grad for n, t in leaves.items() if t.grad is not None}
        return y.detach(), grads, saved.nbytes, saved.shapes()

    tuner = make_tuner(cache=tmp_path / "equal")
    costs = {"forward": {"triton": 2.0, "reference": 1.0},
             "backward": {"triton": 1.0, "reference": 2.0}}
    winners = {op: tuner.decide(key(op, m=48, n=40, k=64, r=8),
                                contenders(make_tuner.clock, costs[op], []))
               for op in costs}
    assert winners == {"forward": "reference", "backward": "triton"}
    results = {backend: run(backend) for backend in winners.values()}
    (y_t, g_t, bytes_t, shapes_t), (y_r, g_r, bytes_r, shapes_r) = (results["triton"],
                                                                     results["reference"])
    assert bytes_t == bytes_r and shapes_t == shapes_r
    assert (48, 64) not in shapes_t  # x is not kept: A is frozen
    y64, g64 = run_float64(case, grad_y)
    assert_kernel_close(y_t, y64, y_r, "y")
    assert set(g_t) == set(g_r) == {"x", "lora_b"}
    for name in g_t:
        assert_kernel_close(g_t[name], g64[name], g_r[name], f"d{name}")
    # what the winners above make of one call: the reference's forward, Triton's backward from
    # the P the reference saved
    y_mix, dx_mix, db_mix = forward_then_backward(case, grad_y, "reference", "triton")
    assert_kernel_close(y_mix, y64, y_r, "y (mixed)")
    assert_kernel_close(dx_mix, g64["x"], g_r["x"], "dx (mixed)")
    assert_kernel_close(db_mix, g64["lora_b"], g_r["lora_b"], "dB (mixed)")


def forward_then_backward(case, grad_y, forward_backend, backward_backend):
    """y, dx, dB of a LoRA-FA call whose forward and backward run on different backends
    (the operator's op bodies, as the autograd formula calls them)."""
    from lowrank_fused import ops
    weight, bias, lora_a, lora_b = (case.weight.detach(), case.bias.detach(),
                                    case.lora_a.detach(), case.lora_b.detach())
    y, p, _, _, _ = ops.run_forward(case.x.detach(), weight, bias, lora_a, lora_b, None, None,
                                    ops.Call(case.scaling, 0.1, 1234, forward_backend))
    dx, _, db, _, _, _ = ops.run_backward(grad_y, None, p, None, weight, lora_a, lora_b, None,
                                          None, None,
                                          ops.Call(case.scaling, 0.1, 1234, backward_backend),
                                          True, False, True, False, False)
    return y, dx, db


def run_float64(case, grad_y):
    """y and the gradients by the reference backend in float64 (the same mask: same seed)."""
    from lowrank_fused import low_rank_linear
    leaves = {n: t.detach().double().requires_grad_(t.requires_grad)
              for n, t in case.tensors().items()}
    y = low_rank_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                        bias=leaves["bias"], scaling=case.scaling, dropout_p=0.1,
                        dropout_seed=1234, backend="reference")
    y.backward(grad_y.double())
    return y.detach(), {n: t.grad for n, t in leaves.items() if t.grad is not None}


# -- the local cache -------------------------------------------------------------------------

SECOND_PROCESS = textwrap.dedent("""
    import json, sys, warnings
    from lowrank_fused.tuning import Tuner, TuningCacheWarning, TuningKey
    from lowrank_fused.tuning.environment import Environment

    warnings.simplefilter("error", TuningCacheWarning)

    cache, table, environment, keys = sys.argv[1:5]
    def never(fn):
        raise AssertionError("timed in the second process")
    def must_not_run():
        raise AssertionError("a contender ran in the second process")
    tuner = Tuner(cache_dir=cache, table=table, timer=never,
                  environment=Environment(**json.loads(environment)))
    for key_id in json.loads(keys):
        tuner.decide(TuningKey.parse(key_id), {"triton": must_not_run, "reference": must_not_run})
    print(json.dumps(tuner.report()))
""")


def run_python(script: str, *args: str, timeout=120) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_second_process_reads_the_cache_and_times_nothing(make_tuner, tmp_path, empty_table):
    calls = []
    tuner = make_tuner()
    tuner.decide(key("forward"), contenders(make_tuner.clock, {"triton": 1.0, "reference": 2.0},
                                            calls))
    tuner.decide(key("backward"), contenders(make_tuner.clock, {"triton": 5.0, "reference": 2.0},
                                             calls))
    out = run_python(SECOND_PROCESS, str(tmp_path / "cache"), str(empty_table),
                     json.dumps(H100.as_dict()), json.dumps([key("forward").id,
                                                             key("backward").id]))
    rows = json.loads(out)
    assert [(row["winner"], row["source"]) for row in rows] == [
        ("triton", "local cache"), ("reference", "local cache")]
    assert rows[0]["times_ms"] == {"triton": 1.0, "reference": 2.0}


def cache_file(tmp_path) -> Path:
    files = list((tmp_path / "cache").glob("tuning-*.json"))
    assert len(files) == 1, files
    return files[0]


def valid_text(tmp_path, make_tuner) -> str:
    """A cache file holding one forward decision of another key (to be damaged)."""
    make_tuner().decide(key(m=2), contenders(make_tuner.clock, {"triton": 1.0, "reference": 2.0},
                                             []))
    return cache_file(tmp_path).read_text()


def damage(kind: str, text: str) -> str:
    data = json.loads(text)
    entry_id = next(iter(data["winners"]))
    if kind == "not JSON":
        return "{this is not json"
    if kind == "truncated":
        return text[: len(text) // 2]
    if kind == "another package version":
        data["environment"]["package"] = "0.0.1"
    elif kind == "another schema":
        data["schema"] = "lowrank_fused.tuning-cache/0"
    elif kind == "a backend that does not exist":
        data["winners"][entry_id] = {"winner": "__import__('os').system('true')",
                                     "times_ms": {"triton": 1.0}}
    elif kind == "a winner that is slower":
        data["winners"][entry_id] = {"winner": "reference",
                                     "times_ms": {"triton": 1.0, "reference": 2.0}}
    elif kind == "a malformed key":
        data["winners"]["forward|bfloat16|float32|lora_fa|bias|7|4096|4096|16"] = \
            data["winners"].pop(entry_id)
    elif kind == "a deep nest":
        return "[" * 100000 + "]" * 100000
    return json.dumps(data)


DAMAGES = ["not JSON", "truncated", "another package version", "another schema",
           "a backend that does not exist", "a winner that is slower", "a malformed key",
           "a deep nest"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_cache_is_ignored_with_one_warning_and_rewritten(kind, tmp_path, make_tuner):
    path_text = valid_text(tmp_path, make_tuner)
    path = cache_file(tmp_path)
    path.write_text(damage(kind, path_text))
    tuner, calls = make_tuner(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in ("forward", "backward"):
            tuner.decide(key(op, m=2), contenders(make_tuner.clock,
                                                   {"triton": 1.0, "reference": 2.0}, calls))
    messages = [str(w.message) for w in caught if issubclass(w.category, TuningCacheWarning)]
    assert len(messages) == 1, messages
    assert str(path) in messages[0]
    assert [row["source"] for row in tuner.report()] == ["timed now", "timed now"]  # retuned
    # rewritten: valid, both keys in it, read by a fresh process-like tuner without a warning
    data = json.loads(path.read_text())
    winners, _, problems = check_cache(data, H100.as_dict(), str(path))
    assert problems == [] and {key("forward", m=2).id, key("backward", m=2).id} <= set(winners)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = make_tuner(timer=never_time)
        assert fresh.decide(key("forward", m=2), {"triton": None, "reference": None}) == "triton"


def test_a_cached_winner_that_is_not_a_contender_here_is_retimed(make_tuner, tmp_path):
    """An entry naming "cuda" where this call's contenders lack it (extension not built)."""
    make_tuner().decide(key(), contenders(make_tuner.clock, {"cuda": 1.0, "reference": 2.0}, []))
    tuner = make_tuner()
    with pytest.warns(TuningCacheWarning, match="not one of this call's contenders"):
        winner = tuner.decide(key(), contenders(make_tuner.clock,
                                                {"triton": 3.0, "reference": 2.0}, []))
    assert winner == "reference" and tuner.report()[0]["source"] == "timed now"


def test_an_unwritable_cache_directory_costs_one_warning_never_a_call(make_tuner, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tuner = make_tuner(cache=blocker / "cache")
    with pytest.warns(TuningCacheWarning, match="kept for this process only"):
        assert tuner.decide(key(), contenders(make_tuner.clock,
                                              {"triton": 1.0, "reference": 2.0}, [])) == "triton"
    assert tuner.decide(key(), {"triton": None, "reference": None}) == "triton"


WRITER = textwrap.dedent("""
    import json, os, sys, time, warnings
    from lowrank_fused.tuning import Tuner, TuningCacheWarning, TuningKey
    from lowrank_fused.tuning.environment import Environment

    warnings.simplefilter("error", TuningCacheWarning)  # a torn file would warn
    cache, table, environment, first, go = sys.argv[1:6]
    tuner = Tuner(cache_dir=cache, table=table, timer=lambda fn: 1e-3,
                  environment=Environment(**json.loads(environment)))
    open(go + "-ready-" + first, "w").close()
    while not os.path.exists(go):
        time.sleep(0.001)
    for n in range(int(first), int(first) + 30):
        key = TuningKey("forward", "bfloat16", "bfloat16", "lora", (), 64, n, 64, 8)
        tuner.decide(key, {"triton": lambda: None, "reference": lambda: None})
""")


def test_two_processes_writing_at_once_leave_a_readable_file_with_both_keys(tmp_path,
                                                                         empty_table):
    go = tmp_path / "go"
    args = [str(tmp_path / "cache"), str(empty_table), json.dumps(H100.as_dict())]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, *args, first, str(go)],
                                cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
               for first in ("1", "31")]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}-ready-{first}").exists() for first in ("1", "31")):
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
        time.sleep(0.01)
    go.touch()  # both start writing at once
    for writer in writers:
        _, err = writer.communicate(timeout=180)
        assert writer.returncode == 0, err[-3000:]
    path = cache_file(tmp_path)
    winners, _, problems = check_cache(json.loads(path.read_text()), H100.as_dict(), str(path))
    assert problems == []
    assert {TuningKey.parse(k).n for k in winners} == set(range(1, 61))
    assert not list(path.parent.glob("*.tmp"))


SLOW_WRITER = textwrap.dedent("""
    import json, sys, time
    from lowrank_fused.tuning import store
    from lowrank_fused.tuning.environment import Environment

    cache, environment, key_id, writing = sys.argv[1:5]
    original = store.write_atomically
    def slow(path, text):  # holds the write (and so the lock) open for a while
        open(writing, "w").close()
        time.sleep(2.0)
        original(path, text)
    store.write_atomically = slow
    store.Store(cache, Environment(**json.loads(environment))).put(
        winners={key_id: {"winner": "triton", "times_ms": {"triton": 1.0}}})
""")


def test_a_write_waits_for_a_slower_one_and_keeps_its_keys(tmp_path):
    """The lost update that the lock prevents: process A has read the file and is writing
    (slowly); B's write must wait for it and merge A's key, not be overwritten by A's."""
    from lowrank_fused.tuning.store import Store
    writing = tmp_path / "writing"
    slow = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "cache"),
                             json.dumps(H100.as_dict()), key(m=1).id, str(writing)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not writing.exists():
        assert time.monotonic() < deadline and slow.poll() is None, slow.stderr.read()
        time.sleep(0.01)
    Store(tmp_path / "cache", H100).put(
        winners={key(m=2).id: {"winner": "reference", "times_ms": {"reference": 1.0}}})
    _, err = slow.communicate(timeout=60)
    assert slow.returncode == 0, err[-3000:]
    fresh = Store(tmp_path / "cache", H100)
    assert fresh.winner(key(m=1).id)["winner"] == "triton"
    assert fresh.winner(key(m=2).id)["winner"] == "reference"


# -- the shipped table -----------------------------------------------------------------------

def test_the_packaged_table_is_what_the_builder_writes():
    from tools.tuning_table import table_text
    data = json.loads(DEFAULT_PATH.read_text())
    assert DEFAULT_PATH.read_text() == table_text(data["gpus"])
    gpus, problems = check_table(data, str(DEFAULT_PATH))
    assert problems == [] and len(gpus) == len(data["gpus"])


def test_the_shipped_table_is_used_when_the_local_cache_misses(make_tuner, tmp_path):
    """A GPU run's cache becomes the table (tools.tuning_table); another machine of that model,
    with an empty cache and other versions, takes its winners without timing; a GPU not in the
    table times."""
    from tools import tuning_table
    run_cache = tmp_path / "gpu-run"
    measured = make_tuner(cache=run_cache)
    measured.decide(key("forward"), contenders(make_tuner.clock,
                                               {"triton": 2.0, "reference": 1.0}, []))
    measured.decide(key("backward"), contenders(make_tuner.clock,
                                                {"triton": 1.0, "reference": 2.0}, []))
    table = tmp_path / "shipped.json"
    (cache,) = run_cache.glob("tuning-*.json")
    assert tuning_table.main([str(cache), "--out", str(table), "--source", "a test run"]) == 0

    pcie = dataclasses.replace(H100, gpu="NVIDIA H100 PCIe", driver="560.1", torch="2.12.0")
    tuner = make_tuner(cache=tmp_path / "elsewhere", table=table, environment=pcie,
                       timer=never_time)
    assert tuner.decide(key("forward"), {"triton": None, "reference": None}) == "reference"
    assert tuner.decide(key("backward"), {"triton": None, "reference": None}) == "triton"
    assert [row["source"] for row in tuner.report()] == ["shipped table"] * 2

    a100 = dataclasses.replace(H100, gpu="NVIDIA A100-SXM4-80GB", capability="8.0")
    other = make_tuner(cache=tmp_path / "a100", table=table, environment=a100)
    other.decide(key("forward"), contenders(make_tuner.clock, {"triton": 1.0, "reference": 2.0},
                                            []))
    assert other.report()[0]["source"] == "timed now"
    # a local entry wins over the table
    local = make_tuner(cache=tmp_path / "a100", table=table, environment=a100, timer=never_time)
    assert local.decide(key("forward"), {"triton": None, "reference": None}) == "triton"
    assert local.report()[0]["source"] == "local cache"


@pytest.mark.parametrize("text", [
    "not json",
    json.dumps({"schema": "lowrank_fused.tuning-table/1", "about": "", "gpus": [dict(
        name=H100.gpu, model="H100", capability="9.0", measured_with={}, source=None,
        winners={key().id: {"winner": "evil", "times_ms": {"evil": 0.0}}}, kernels={})]}),
])
def test_a_damaged_shipped_table_is_ignored_with_one_warning(make_tuner, tmp_path, text):
    table = tmp_path / "bad-table.json"
    table.write_text(text)
    tuner = make_tuner(table=table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op in ("forward", "backward"):
            tuner.decide(key(op), contenders(make_tuner.clock, {"triton": 1.0, "reference": 2.0},
                                             []))
    assert len([w for w in caught if issubclass(w.category, TuningCacheWarning)]) == 1
    assert {row["source"] for row in tuner.report()} == {"timed now"}


def test_the_cache_lives_under_tritons_cache_directory_unless_moved(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWRANK_FUSED_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert tuning.cache_dir() == tmp_path / "triton" / "lowrank_fused"
    monkeypatch.setenv("LOWRANK_FUSED_CACHE_DIR", str(tmp_path / "mine"))
    assert tuning.cache_dir() == tmp_path / "mine"


def test_the_table_builder_refuses_a_damaged_cache_and_leaves_the_table(tmp_path, capsys):
    from tools import tuning_table
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": CACHE_SCHEMA, "environment": H100.as_dict(),
                               "winners": {"x": {"winner": "evil", "times_ms": {}}},
                               "kernels": {}}))
    out = tmp_path / "table.json"
    out.write_text("unchanged")
    assert tuning_table.main([str(bad), "--out", str(out)]) == 2
    assert out.read_text() == "unchanged" and "tuning key" in capsys.readouterr().err


def test_gpu_model_names():
    assert gpu_model("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_model("NVIDIA H200") == "H200"
    assert gpu_model("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_model("NVIDIA GeForce RTX 4090") == "NVIDIA GeForce RTX 4090"  # no model: the name


# -- the report, tracing and graph capture ---------------------------------------------------

def test_tuning_report_lists_what_ran_and_where_each_decision_came_from(make_tuner, monkeypatch,
                                                                         tmp_path):
    first = make_tuner()
    first.decide(key("forward"), contenders(make_tuner.clock, {"triton": 1.0, "reference": 2.0},
                                            []))
    tuner = tuning.configure(cache_dir=tmp_path / "cache", table=make_tuner().table(),
                             environment=H100, timer=ClockTimer(make_tuner.clock, reps=1))
    try:
        tuner.decide(key("forward"), {"triton": None, "reference": None})  # local cache
        tuner.decide(key("backward"), contenders(make_tuner.clock,
                                                 {"triton": 4.0, "reference": 3.0}, []))
        tuner.decide(key("backward", r=64), {"reference": None})  # a single contender
        import lowrank_fused
        rows = lowrank_fused.tuning_report()
    finally:
        tuning.configure()
    assert [(r["key"], r["winner"], r["source"]) for r in rows] == [
        (key("forward").id, "triton", "local cache"),
        (key("backward").id, "reference", "timed now"),
        (key("backward", r=64).id, "reference", "only contender")]
    assert rows[1]["contenders"] == ["triton", "reference"]
    assert rows[1]["times_ms"] == {"triton": 4.0, "reference": 3.0}
    assert rows[1]["device"] == H100.gpu and "backward lora_fa" in rows[1]["description"]


def test_under_tracing_nothing_is_timed_and_the_default_is_not_remembered(make_tuner,
                                                                           monkeypatch):
    tuner, calls = make_tuner(), []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    runs = contenders(make_tuner.clock, {"triton": 2.0, "reference": 1.0}, calls)
    assert tuner.decide(key(), runs, default="triton") == "triton"
    assert calls == [] and tuner.report()[0]["source"] == "default (untimed)"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert tuner.decide(key(), runs) == "reference"  # the eager call times it
    assert tuner.report()[0]["source"] == "timed now"
    # under tracing again: the decision now recorded is used
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuner.decide(key(), runs, default="triton") == "reference"


def test_untimed_by_request_uses_what_is_recorded_else_the_default(make_tuner):
    tuner, calls = make_tuner(), []
    runs = contenders(make_tuner.clock, {"triton": 2.0, "reference": 1.0}, calls)
    seen = []
    tuner.add_listener(seen.append)
    for _ in range(2):
        assert tuner.decide(key(), runs, untimed="LOWRANK_FUSED_AUTOTUNE=quick") == "triton"
    assert calls == [] and tuner.report()[0]["note"] == "LOWRANK_FUSED_AUTOTUNE=quick"
    assert len(seen) == 1 and tuner.decided(key()) is None  # reported once, not remembered
    assert tuner.decide(key(), runs) == "reference" and tuner.decided(key()) == "reference"


def test_under_graph_capture_a_new_key_raises_capture_error_and_a_decided_one_does_not(
        make_tuner, monkeypatch):
    from lowrank_fused.triton_kernels import capture
    tuner, calls = make_tuner(), []
    runs = contenders(make_tuner.clock, {"triton": 2.0, "reference": 1.0}, calls)
    tuner.decide(key("forward"), runs)
    monkeypatch.setattr(capture, "capturing", lambda: True)
    assert tuner.decide(key("forward"), runs) == "reference"
    calls.clear()
    with pytest.raises(capture.CaptureError, match="CUDA graph is being captured"):
        tuner.decide(key("backward"), runs)
    assert calls == []
    assert tuning.CaptureError is capture.CaptureError


# -- keys ------------------------------------------------------------------------------------

def test_keys_bucket_m_and_round_trip_through_their_id():
    k = TuningKey.of("backward", torch.float16, torch.float32, "lora_xs", 3000, 11008, 4096, 64,
                     flags=["dropout", "bias", "needs_dx"])
    assert k.m == 4096 and k.flags == ("bias", "dropout", "needs_dx")
    assert TuningKey.parse(k.id) == k
    assert TuningKey.of("forward", torch.float16, torch.float16, "lora", 1, 8, 8, 1).m == 1


@pytest.mark.parametrize("text", [
    "forward|bfloat16|float32|lora_fa|bias|8192|4096|4096",  # a field short
    "sideways|bfloat16|float32|lora_fa|bias|8192|4096|4096|16",
    "forward|bfloat16|float32|lora_fa|bias|8000|4096|4096|16",  # M not bucketed
    "forward|bfloat16|float32|lora_fa|dropout+bias|8192|4096|4096|16",  # not canonical
    "forward|bfloat16|float32|lora_fa|rm -rf|8192|4096|4096|16",
    "forward|bfloat16|float32|lora_fa|bias|08192|4096|4096|16",
    "forward|int8|float32|lora_fa|bias|8192|4096|4096|16",
])
def test_malformed_key_ids_are_refused(text):
    with pytest.raises(ValueError):
        TuningKey.parse(text)
