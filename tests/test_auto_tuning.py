""""auto" on a GPU through the real dispatch path (issue 30): ``dispatch.select`` times the fused
kernels against the reference once per key, forward and backward apart, through
``lowrank_fused.tuning``, and remembers the winner.

The CPU stands in for a GPU: ``dispatch._on_gpu`` answers True for CPU tensors, the Triton
kernels run on the interpreter (TRITON_INTERPRET=1, set by conftest), the tuner is configured
with a hand-written H100 environment, a temporary cache and a fake clock, and each backend's
functions advance the clock by an injected cost per call. The module-level rules of the tuner
(damaged files, concurrent writers, the shipped table's matching) are tests/test_tuning.py's;
here is what the dispatch adds."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_fused
from lowrank_fused import dispatch, low_rank_linear, stats, tuning
from lowrank_fused.backends import pytorch as reference_backend
from lowrank_fused.saved_activations import SavedActivations
from lowrank_fused.tuning import TuningCacheWarning
from lowrank_fused.tuning.shipped import DEFAULT_PATH
from lowrank_fused.tuning.timing import ClockTimer
from tests.helpers import TRAINABLE, make_case
from tests.tolerance import assert_kernel_close
from tests.test_tuning import H100, damage

ROOT = Path(__file__).resolve().parents[1]
M, K, N, R = 24, 40, 32, 8
FUNCTIONS = ("forward", "backward", "dora_forward", "dora_backward")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="needs the Triton interpreter (CPU tensors)")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CPU tensors taken as a GPU's; a tuner over a temporary cache and the packaged (empty)
    table; ``costs[(backend, op)]`` ms added to the fake clock per call of that backend's
    pass. Yields an object with ``costs``, ``clock``, ``calls`` ([(backend, function)] of every
    backend call) and ``cache``."""
    from lowrank_fused.backends import triton as triton_backend
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: True)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    monkeypatch.delenv("LOWRANK_FUSED_AUTOTUNE", raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    state = type("FakeGpu", (), {})()
    state.clock, state.costs, state.calls = FakeClock(), {}, []
    state.cache = tmp_path / "cache"
    for module in (triton_backend, reference_backend):
        for function in FUNCTIONS:
            monkeypatch.setattr(module, function, _costed(state, module, function))
    state.configure = lambda **options: tuning.configure(**{
        "cache_dir": state.cache, "table": DEFAULT_PATH, "environment": H100,
        "timer": ClockTimer(state.clock, reps=3), **options})
    state.configure()
    stats.reset()
    yield state
    tuning.configure()


def _costed(state, module, function):
    original = getattr(module, function)
    op = "forward" if function.endswith("forward") else "backward"

    def run(*args, **kwargs):
        state.calls.append((module.NAME, function))
        state.clock.now += state.costs.get((module.NAME, op), 1.0) / 1e3
        return original(*args, **kwargs)
    return run


def lora_fa_case(dora=False):
    """LoRA-FA (A frozen: P saved, never x) with bias; DoRA adds a trainable magnitude."""
    case = make_case((M,), K, N, R, trainable=TRAINABLE["lora_fa"], dtype=torch.float32)
    magnitude = None
    if dora:
        g = torch.Generator().manual_seed(5)
        magnitude = (1 + 0.1 * torch.randn(N, generator=g)).requires_grad_()
    return case, magnitude


def run_call(case, magnitude, backend, name="layer", dropout_p=0.1, dtype=None):
    """y, the gradients and the saved activations of one call with ``backend`` (the inputs
    as they are, or converted to ``dtype``: the float64 truth on the same values)."""
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(1))
    leaves = {n: t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
              for n, t in case.tensors().items()}
    m = (None if magnitude is None
         else magnitude.detach().to(dtype or magnitude.dtype).requires_grad_())
    grad_y = grad_y.to(dtype or grad_y.dtype)
    with SavedActivations() as saved:
        y = low_rank_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                            bias=leaves["bias"], scaling=case.scaling, dropout_p=dropout_p,
                            dropout_seed=1234, backend=backend, magnitude=m, name=name)
    y.backward(grad_y)
    grads = {n: t.grad for n, t in leaves.items() if t.grad is not None}
    if m is not None:
        grads["magnitude"] = m.grad
    return y.detach(), grads, saved.nbytes, saved.shapes()


def timed_keys(report) -> list:
    return [(row["key"].split("|")[0], row["winner"], row["source"]) for row in report]


# -- the choice, forward and backward apart --------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("forward_winner,backward_winner", [("reference", "triton"),
                                                            ("triton", "reference")])
def test_auto_times_the_kernels_against_the_reference_forward_and_backward_apart(
        fake_gpu, dora, forward_winner, backward_winner):
    """Injected costs make one backend faster forward and the other backward: "auto" runs each
    pass's winner (the backward from the tensors the other backend's forward saved), times each
    key once, and gives the outputs, gradients and saved bytes of the explicit backends."""
    loser = {"triton": "reference", "reference": "triton"}
    fake_gpu.costs = {(forward_winner, "forward"): 1.0, (loser[forward_winner], "forward"): 2.0,
                      (backward_winner, "backward"): 3.0,
                      (loser[backward_winner], "backward"): 5.0}
    case, magnitude = lora_fa_case(dora)
    y, grads, nbytes, shapes = run_call(case, magnitude, "auto")

    counts = stats.snapshot()["layer"]
    assert counts[forward_winner]["forward"] == 1 and counts[backward_winner]["backward"] == 1
    report = lowrank_fused.tuning_report()
    assert timed_keys(report) == [("forward", forward_winner, "timed now"),
                                  ("backward", backward_winner, "timed now")]
    assert report[0]["times_ms"] == {"triton": fake_gpu.costs[("triton", "forward")],
                                     "reference": fake_gpu.costs[("reference", "forward")]}
    assert report[1]["contenders"] == ["triton", "reference"]
    assert ("dora" in report[0]["key"].split("|")[4]) == dora
    assert report[1]["key"].split("|")[3] == "lora_fa"  # the backward's method: B trains
    # the key is the op's own shapes: M bucketed to a power of two, N, K, r
    assert all(row["key"].endswith(f"|32|{N}|{K}|{R}") for row in report)

    explicit = {backend: run_call(case, magnitude, backend) for backend in ("triton", "reference")}
    for backend, (_, _, other_bytes, other_shapes) in explicit.items():
        assert (nbytes, shapes) == (other_bytes, other_shapes), backend
    assert (M, K) not in shapes  # A frozen: x is never kept, whichever backend runs
    y64, grads64, _, _ = run_call(case, magnitude, "reference", dtype=torch.float64)
    y_low, grads_low = explicit["reference"][:2]
    assert_kernel_close(y, y64, y_low, "y")
    assert set(grads) == set(grads64) == {"x", "lora_b"} | ({"magnitude"} if dora else set())
    for name in grads:
        assert_kernel_close(grads[name], grads64[name], grads_low[name], f"d{name}")

    # decided: a second call times nothing and runs the winners once each
    fake_gpu.calls.clear()
    run_call(case, magnitude, "auto")
    assert fake_gpu.calls == [(forward_winner, "dora_forward" if dora else "forward"),
                              (backward_winner, "dora_backward" if dora else "backward")]
    assert len(lowrank_fused.tuning_report()) == 2


def test_explicit_backends_never_go_through_the_tuner(fake_gpu, monkeypatch):
    def no_tuning(*args, **kwargs):
        raise AssertionError("an explicit backend reached the tuner")
    monkeypatch.setattr(tuning, "tuner", no_tuning)
    case, _ = lora_fa_case()
    for backend in ("triton", "reference"):
        fake_gpu.calls.clear()
        run_call(case, None, backend)
        assert {name for name, _ in fake_gpu.calls} == {backend}


def test_auto_on_the_cpu_never_touches_the_tuning_machinery(monkeypatch):
    def no_tuning(*args, **kwargs):
        raise AssertionError("auto on the CPU reached the tuner")
    for name in ("tuner", "decide"):
        monkeypatch.setattr(tuning, name, no_tuning)
    monkeypatch.setattr(tuning.TuningKey, "of", no_tuning)
    case, magnitude = lora_fa_case(dora=True)
    stats.reset()
    run_call(case, magnitude, "auto", name="cpu")
    assert stats.snapshot()["cpu"] == {"reference": {"forward": 1, "backward": 1}}


def test_quick_autotuning_runs_the_kernels_untimed(fake_gpu, monkeypatch):
    monkeypatch.setenv("LOWRANK_FUSED_AUTOTUNE", "quick")
    fake_gpu.configure(timer=lambda fn: pytest.fail("timed under quick autotuning"))
    case, _ = lora_fa_case()
    run_call(case, None, "auto")
    assert {name for name, _ in fake_gpu.calls} == {"triton"}
    rows = lowrank_fused.tuning_report()
    assert [(r["winner"], r["source"], r["note"]) for r in rows] == [
        ("triton", "default (untimed)", "LOWRANK_FUSED_AUTOTUNE=quick")] * 2


def test_importing_the_package_loads_neither_triton_nor_the_tuning_hooks():
    """The tuning is imported with the package, the kernels and Triton only with the Triton
    backend (which installs the hooks): a CPU user pays for neither."""
    code = ("import sys, lowrank_fused; "
            "print(sorted(m for m in ('triton', 'lowrank_fused.triton_kernels', "
            "'lowrank_fused.backends.triton') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_qdora_and_the_contenders_of_each_call():
    """The CUDA extension competes for plain calls only (no DoRA or 4-bit kernels); QDoRA has
    nothing to time."""
    original = dispatch.cuda_extension_available
    try:
        dispatch.cuda_extension_available = lambda: True
        assert dispatch.contenders() == ("triton", "cuda", "reference")
        assert dispatch.contenders(dora=True) == dispatch.contenders(four_bit=True) == (
            "triton", "reference")
        assert dispatch.contenders(four_bit=True, dora=True) == ("reference",)
    finally:
        dispatch.cuda_extension_available = original


# -- remembered ------------------------------------------------------------------------------

SECOND_PROCESS = textwrap.dedent("""
    import json, sys, warnings
    import lowrank_fused
    from lowrank_fused import dispatch, low_rank_linear, tuning
    from lowrank_fused.backends import pytorch as reference, triton as kernels
    from lowrank_fused.tuning import TuningCacheWarning
    from lowrank_fused.tuning.environment import Environment
    from tests.helpers import TRAINABLE, make_case

    warnings.simplefilter("error", TuningCacheWarning)
    cache, table, environment = sys.argv[1:4]
    dispatch._on_gpu = lambda device: True
    dispatch.cuda_extension_available = lambda: False
    def never(fn):
        raise AssertionError("timed in the second process")
    tuning.configure(cache_dir=cache, table=table, timer=never,
                     environment=Environment(**json.loads(environment)))
    ran = []
    for module in (kernels, reference):
        for name in ("forward", "backward"):
            def counted(*args, _module=module, _name=name, _run=getattr(module, name), **kw):
                ran.append([_module.NAME, _name])
                return _run(*args, **kw)
            setattr(module, name, counted)
    case = make_case((24,), 40, 32, 8, trainable=TRAINABLE["lora_fa"], dtype=__import__("torch").float32)
    y = low_rank_linear(case.x, case.weight, case.lora_a, case.lora_b, bias=case.bias,
                        scaling=case.scaling, dropout_p=0.1, dropout_seed=1234)
    y.sum().backward()
    print(json.dumps({"report": lowrank_fused.tuning_report(), "ran": ran}))
""")


def run_second_process(cache, table) -> dict:
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(cache), str(table),
                           json.dumps(H100.as_dict())], capture_output=True, text=True,
                          timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def decide_reference_forward_triton_backward(fake_gpu):
    fake_gpu.costs = {("triton", "forward"): 2.0, ("reference", "forward"): 1.0,
                      ("triton", "backward"): 1.0, ("reference", "backward"): 2.0}
    case, _ = lora_fa_case()
    run_call(case, None, "auto")


def test_a_second_process_reads_the_cache_and_times_nothing(fake_gpu):
    decide_reference_forward_triton_backward(fake_gpu)
    out = run_second_process(fake_gpu.cache, DEFAULT_PATH)
    assert timed_keys(out["report"]) == [("forward", "reference", "local cache"),
                                         ("backward", "triton", "local cache")]
    assert out["ran"] == [["reference", "forward"], ["triton", "backward"]]  # the winners, once


def test_the_shipped_table_is_used_when_the_local_cache_misses(fake_gpu, tmp_path):
    """A GPU run's cache written into a table (tools.tuning_table): a process with an empty
    local cache takes the table's winners and times nothing."""
    from tools import tuning_table
    decide_reference_forward_triton_backward(fake_gpu)
    (cache,) = fake_gpu.cache.glob("tuning-*.json")
    table = tmp_path / "table.json"
    assert tuning_table.main([str(cache), "--out", str(table), "--source", "test"]) == 0
    out = run_second_process(tmp_path / "empty-cache", table)
    assert timed_keys(out["report"]) == [("forward", "reference", "shipped table"),
                                         ("backward", "triton", "shipped table")]


@pytest.mark.parametrize("kind", ["truncated", "another package version",
                                  "a backend that does not exist", "a winner that is slower"])
def test_a_damaged_cache_entry_costs_one_warning_and_a_retune_never_a_call(fake_gpu, kind):
    decide_reference_forward_triton_backward(fake_gpu)
    (path,) = fake_gpu.cache.glob("tuning-*.json")
    path.write_text(damage(kind, path.read_text()))
    fake_gpu.configure()  # a new process
    fake_gpu.costs = {("triton", "forward"): 1.0, ("reference", "forward"): 2.0,
                      ("triton", "backward"): 2.0, ("reference", "backward"): 1.0}
    case, _ = lora_fa_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_call(case, None, "auto")
    assert len([w for w in caught if issubclass(w.category, TuningCacheWarning)]) == 1
    rows = lowrank_fused.tuning_report()
    retimed = {r["key"].split("|")[0]: r["winner"] for r in rows if r["source"] == "timed now"}
    # a file that is not usable at all: both keys again; a bad entry (the backward's, the
    # first in the file): that key alone, the other read from the file
    whole_file = kind in ("truncated", "another package version")
    assert retimed == ({"forward": "triton", "backward": "reference"} if whole_file
                       else {"backward": "reference"}), rows
    out = run_second_process(fake_gpu.cache, DEFAULT_PATH)  # rewritten: read back, no warning
    assert {row["source"] for row in out["report"]} == {"local cache"}


def test_warmup_decides_each_key_of_a_model_before_training(fake_gpu):
    """lowrank_fused.warmup on a model of the real layer: each distinct key (two layers' shapes,
    forward and backward) decided once, timed; a new process warming up again reads them all;
    the model keeps no gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        lowrank_fused.LowRankLinear(K, N, R, method="lora_fa", dropout=0.1),
        torch.nn.GELU(), lowrank_fused.LowRankLinear(N, K, R))
    batch = torch.randn(M, K)
    rows = lowrank_fused.warmup(model, batch, progress=False)
    assert [(r["key"].split("|")[0], r["source"]) for r in rows] == [
        ("forward", "timed now"), ("forward", "timed now"),
        ("backward", "timed now"), ("backward", "timed now")]
    assert all(p.grad is None for p in model.parameters())
    fake_gpu.configure(timer=lambda fn: pytest.fail("timed again"))
    again = lowrank_fused.warmup(model, batch, progress=False)
    assert [r["key"] for r in again] == [r["key"] for r in rows]
    assert {r["source"] for r in again} == {"local cache"}


# -- capture and compile ---------------------------------------------------------------------

def test_under_graph_capture_a_decided_key_runs_and_a_new_one_raises(fake_gpu, monkeypatch):
    from lowrank_fused.triton_kernels import capture
    decide_reference_forward_triton_backward(fake_gpu)
    monkeypatch.setattr(capture, "capturing", lambda: True)
    case, _ = lora_fa_case()
    run_call(case, None, "auto")  # both keys decided: they run
    other = make_case((M,), K, N, 4, trainable=TRAINABLE["lora_fa"], dtype=torch.float32)
    with pytest.raises(capture.CaptureError, match="CUDA graph is being captured"):
        run_call(other, None, "auto")


def test_under_torch_compile_the_choice_is_made_at_run_time_never_while_tracing(fake_gpu):
    """A real torch.compile(fullgraph=True) of an "auto" call: the custom ops are opaque to
    dynamo, so select runs in the op bodies when the compiled code runs, with real tensors:
    each contender and the timer run outside tracing, once per key, and the compiled result
    is the eager one."""
    seen = []
    timer = ClockTimer(fake_gpu.clock, reps=3)

    def watching_timer(fn):
        seen.append(torch.compiler.is_compiling())
        return timer(fn)
    fake_gpu.configure(timer=watching_timer)
    fake_gpu.costs = {("triton", "forward"): 2.0, ("reference", "forward"): 1.0,
                      ("triton", "backward"): 1.0, ("reference", "backward"): 2.0}
    case, _ = lora_fa_case()

    def f(x, weight, lora_a, lora_b, bias):
        return low_rank_linear(x, weight, lora_a, lora_b, bias=bias, scaling=case.scaling,
                               backend="auto", name="compiled")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)  # inductor
    leaves = {n: t.detach().clone().requires_grad_(t.requires_grad)
              for n, t in case.tensors().items()}
    args = [leaves[n] for n in ("x", "weight", "lora_a", "lora_b", "bias")]
    y = compiled(*args)
    y.sum().backward()
    assert seen == [False, False, False, False]  # two contenders, two passes, none traced
    assert timed_keys(lowrank_fused.tuning_report()) == [("forward", "reference", "timed now"),
                                                        ("backward", "triton", "timed now")]
    counts = stats.snapshot()["compiled"]
    assert counts["reference"]["forward"] == 1 and counts["triton"]["backward"] == 1
    eager = {n: t.detach().clone().requires_grad_(t.requires_grad)
             for n, t in case.tensors().items()}
    y_eager = f(*[eager[n] for n in ("x", "weight", "lora_a", "lora_b", "bias")])
    torch.testing.assert_close(y, y_eager)
    y2 = compiled(*args)  # decided: nothing more is timed
    y2.sum().backward()
    assert len(seen) == 4


# -- the summary of enable_fused -------------------------------------------------------------

def test_enable_fused_says_auto_is_timed_per_shape_on_a_gpu(monkeypatch):
    pytest.importorskip("peft")
    from lowrank_fused.peft import disable_fused, enable_fused
    from tests.peft_helpers import small_peft
    model = small_peft()
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: True)
    fused = enable_fused(model)
    try:
        assert fused.backends == {"cpu": "auto (timed per shape: triton, reference)"}
        assert "backend auto → auto (timed per shape: triton, reference) on cpu" in str(fused)
        assert enable_fused(model, backend="triton").backends == {"cpu": "triton"}
    finally:
        disable_fused(model)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: False)
    assert dispatch.describe("auto", torch.device("cpu")) == "reference"


# -- tools.probe's first training step -------------------------------------------------------

def test_the_probes_warm_first_step_times_nothing(monkeypatch, tmp_path):
    """tools.probe's cold/warm first step, on the CPU standing in for a GPU: the cold step
    times every key of the model (its three shapes, forward and backward), the warm one (a new
    tuner over the same cache, no kernel choice in memory: a second process's view) times
    nothing, and the decisions land in this machine's tuning cache."""
    from tools import model, probe
    monkeypatch.setattr(dispatch, "_on_gpu", lambda device: True)
    monkeypatch.setattr(dispatch, "cuda_extension_available", lambda: False)
    monkeypatch.setattr(probe, "LLAMA_DRY", dict(layers=1, d=32, ff=48, batch=1, seq=16,
                                                 head_dim=16, vocab=64))
    monkeypatch.setattr(probe, "have", lambda package: package == "triton")  # the Linear stack
    monkeypatch.setenv("LOWRANK_FUSED_CACHE_DIR", str(tmp_path / "machine"))
    rows = []
    p = probe.Probe(torch.device("cpu"), model.Hardware(), model.Code(), sink=rows.append)
    probe.llama_first_step_group(p, "first step")
    steps = {r["name"]: r for r in rows if "timed" in r}
    cold, warm = steps["first training step, cold"], steps["first training step, warm"]
    # three shapes forward; backward four: q, k, v of the first block have no dx to compute
    assert cold["timed"]["backend keys"] == 7 and cold["sources"] == {"timed now": 7}
    assert warm["timed"] == {"configs benchmarked": 0, "variant timings": 0, "backend keys": 0}
    assert warm["sources"] == {"local cache": 7}
    [report] = [r for r in rows if r["name"] == "tuning_report"]
    assert sum(report["winners"].values()) == 7
    assert len(list((tmp_path / "machine").glob("tuning-*.json"))) == 1
