"""The kernel-level half of lowrank_fused.tuning: a Triton autotuner whose chosen configs persist
in the tuning cache (``PersistentAutotuner``, through Triton's ``check_disk_cache`` hook) and
the parallel precompile of a key's candidate configs. Triton's benchmark is replaced by a
function that records its calls: no GPU is needed."""
import json
import threading
import warnings

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner

from lowrank_fused.tuning import TuningCacheWarning, Tuner, parallel
from lowrank_fused.tuning.autotune import PersistentAutotuner, config_json
from lowrank_fused.tuning.environment import Environment

H100 = Environment("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", "12.4", "2.11.0", "3.6.0",
                   "0.1.0", "0123456789abcdef")
CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3),
           triton.Config({"BLOCK": 128}, num_warps=8, num_stages=2)]
TUNING_KEY = (4096, "torch.bfloat16")


@triton.jit
def _scale(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)


class Tuned(PersistentAutotuner, Autotuner):
    def __init__(self, tuner):
        super().__init__(_scale, _scale.arg_names, CONFIGS, ["n"], None, None)
        self.cache_results = True
        self.tuner = tuner


class Bench:
    """Stands in for Autotuner.run's benchmark: the second config wins."""

    def __init__(self, autotuner):
        self.autotuner, self.calls = autotuner, 0

    def __call__(self):
        self.calls += 1
        self.autotuner.configs_timings = {CONFIGS[0]: [2.0, 1.9, 2.1], CONFIGS[1]: [1.0, 0.9, 1.1]}
        self.autotuner.cache[TUNING_KEY] = CONFIGS[1]


@pytest.fixture
def tuner(tmp_path):
    def make():
        return Tuner(cache_dir=tmp_path / "cache", table=tmp_path / "no-table.json",
                     environment=H100, timer=lambda fn: 1.0)
    return make


def tune(tuner) -> tuple:
    autotuner = Tuned(tuner)
    bench = Bench(autotuner)
    restored = autotuner.check_disk_cache(TUNING_KEY, CONFIGS, bench)
    return restored, bench.calls, autotuner.cache.get(TUNING_KEY)


def test_a_tuned_config_is_restored_by_the_next_process_without_timing(tuner, tmp_path):
    assert tune(tuner()) == (False, 1, CONFIGS[1])
    (path,) = (tmp_path / "cache").glob("tuning-*.json")
    (entry,) = json.loads(path.read_text())["kernels"].values()
    assert entry == {"choice": config_json(CONFIGS[1]), "times_ms": [2.0, 1.0]}
    assert tune(tuner()) == (True, 0, CONFIGS[1])  # a new Tuner: what a new process has


def test_a_config_that_is_not_a_candidate_is_ignored_with_a_warning_and_retuned(tuner, tmp_path):
    tune(tuner())
    (path,) = (tmp_path / "cache").glob("tuning-*.json")
    data = json.loads(path.read_text())
    (entry,) = data["kernels"].values()
    entry["choice"]["kwargs"]["BLOCK"] = 7  # would not even compile
    path.write_text(json.dumps(data))
    with pytest.warns(TuningCacheWarning, match="not a candidate"):
        assert tune(tuner()) == (False, 1, CONFIGS[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tune(tuner()) == (True, 0, CONFIGS[1])  # rewritten


def test_a_changed_config_list_is_a_new_entry(tuner):
    tune(tuner())
    autotuner = Tuned(tuner())
    bench = Bench(autotuner)
    assert not autotuner.check_disk_cache(TUNING_KEY, CONFIGS[::-1], bench)
    assert bench.calls == 1


def test_no_timing_under_graph_capture(tuner, monkeypatch):
    from lowrank_fused.triton_kernels import capture
    tune(tuner())
    monkeypatch.setattr(capture, "capturing", lambda: True)
    assert tune(tuner()) == (True, 0, CONFIGS[1])  # restored: nothing to time
    autotuner = Tuned(tuner())
    bench = Bench(autotuner)
    with pytest.raises(capture.CaptureError):
        autotuner.check_disk_cache((8192, "torch.bfloat16"), CONFIGS, bench)
    assert bench.calls == 0


def test_one_config_is_not_recorded(tuner, tmp_path):
    autotuner = Tuned(tuner())
    calls = []
    assert not autotuner.check_disk_cache(TUNING_KEY, CONFIGS[:1], lambda: calls.append(1))
    assert calls == [1] and not list((tmp_path / "cache").glob("tuning-*.json"))


def test_precompile_runs_the_compiles_at_once():
    """Three compile-only calls, three workers: each compile waits at a barrier of three, so
    they pass only if they run concurrently; leaving the mode finalises all three."""
    from triton.runtime import _async_compile
    barrier = threading.Barrier(3, timeout=20)
    finalised = []

    def compile_only(i):
        def call():
            mode = _async_compile.active_mode.get()
            mode.submit(("kernel", i), lambda: (barrier.wait(), i)[1], finalised.append)
        return call
    assert parallel.precompile([compile_only(i) for i in range(3)], workers=3)
    assert sorted(finalised) == [0, 1, 2]
    assert _async_compile.active_mode.get() is None
    assert not parallel.precompile([compile_only(0)], workers=3)  # nothing to overlap


def test_precompile_configs_compiles_each_candidate_with_the_launch_arguments():
    from triton.runtime import _async_compile
    seen = []

    class Fn:
        def warmup(self, **kwargs):
            assert _async_compile.active_mode.get() is not None
            seen.append(kwargs)

    class Launch:
        fn = Fn()
        nargs = {"x_ptr": torch.zeros(4), "n": 4}
    assert parallel.precompile_configs(Launch(), CONFIGS, {"HAS_DROPOUT": True}, workers=2)
    assert [(s["BLOCK"], s["num_warps"], s["HAS_DROPOUT"], s["n"], s["grid"]) for s in seen] == [
        (64, 4, True, 4, (1,)), (128, 8, True, 4, (1,))]


def test_the_gemm_variant_is_remembered(tuner):
    from lowrank_fused.tuning.autotune import remembered_variant
    timed = []

    def time_variants():
        timed.append(1)
        return {"tiled": 0.9, "tma": 0.8}
    assert remembered_variant("fused_linear", torch.bfloat16, 8192, time_variants,
                              tuner=tuner()) == "tma"
    assert remembered_variant("fused_linear", torch.bfloat16, 8192, time_variants,
                              tuner=tuner()) == "tma"
    assert timed == [1]  # the second Tuner (a new process) restored it
    assert remembered_variant("fused_linear", torch.float16, 8192,
                              lambda: {"tiled": 0.7, "tma": None}, tuner=tuner()) == "tiled"
