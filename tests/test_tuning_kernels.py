"""The kernel-level half of lowrank_fused.tuning: the kernels' autotuner
(``triton_kernels/autotuner.py``'s ``_Autotuner``), whose chosen configs persist in the tuning
cache through the ``choice_hook`` the Triton backend installs (``tuning.autotune.restore_or_tune``
behind Triton's ``check_disk_cache``), the GEMM variant's ``variant_hook``, and the parallel
precompile of a key's candidate configs. Triton's benchmark is replaced by a function that
records its calls: no GPU is needed."""
import json
import threading
import warnings

import pytest
import torch
import triton
import triton.language as tl

from lowrank_fused import tuning
from lowrank_fused.backends import triton as triton_backend  # installs the hooks
from lowrank_fused.triton_kernels import autotuner as kernels_autotuner, capture, variants
from lowrank_fused.tuning import TuningCacheWarning, parallel
from lowrank_fused.tuning.autotune import config_json, remembered_variant, restore_or_tune
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


def _keep_all(configs, named_args, **kwargs):
    return configs


def autotuner(quick=False):
    """The kernels' own autotuner class over a tiny kernel (what ``launcher`` builds on a GPU)."""
    return kernels_autotuner._Autotuner(_scale, CONFIGS, ["n"], None, _keep_all, quick=quick)


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
    """make() -> a fresh process Tuner over one cache directory: what a new process has."""
    def make():
        return tuning.configure(cache_dir=tmp_path / "cache", table=tmp_path / "no-table.json",
                                environment=H100, timer=lambda fn: 1.0)
    yield make
    tuning.configure()


def tune(tuner, key=TUNING_KEY, configs=CONFIGS) -> tuple:
    """(restored without timing, benchmark calls, the config chosen) of one launch's choice."""
    tuner()
    tuned = autotuner()
    bench = Bench(tuned)
    restored = tuned.check_disk_cache(key, configs, bench)
    return restored, bench.calls, tuned.cache.get(key)


def test_the_triton_backend_installs_the_hooks_and_the_autotuner_persists():
    assert kernels_autotuner.choice_hook is restore_or_tune
    assert variants.variant_hook is remembered_variant
    assert autotuner().cache_results  # Autotuner.run asks check_disk_cache for a new key
    assert triton_backend.NAME == "triton"


def test_a_tuned_config_is_restored_by_the_next_process_without_timing(tuner, tmp_path):
    assert tune(tuner) == (False, 1, CONFIGS[1])
    (path,) = (tmp_path / "cache").glob("tuning-*.json")
    (entry,) = json.loads(path.read_text())["kernels"].values()
    assert entry == {"choice": config_json(CONFIGS[1]), "times_ms": [2.0, 1.0]}
    assert tune(tuner) == (True, 0, CONFIGS[1])  # a new Tuner: what a new process has


def test_a_config_that_is_not_a_candidate_is_ignored_with_a_warning_and_retuned(tuner, tmp_path):
    tune(tuner)
    (path,) = (tmp_path / "cache").glob("tuning-*.json")
    data = json.loads(path.read_text())
    (entry,) = data["kernels"].values()
    entry["choice"]["kwargs"]["BLOCK"] = 7  # would not even compile
    path.write_text(json.dumps(data))
    with pytest.warns(TuningCacheWarning, match="not a candidate"):
        assert tune(tuner) == (False, 1, CONFIGS[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tune(tuner) == (True, 0, CONFIGS[1])  # rewritten


def test_a_changed_config_list_is_a_new_entry(tuner):
    tune(tuner)
    assert tune(tuner, configs=CONFIGS[::-1])[:2] == (False, 1)


def test_under_graph_capture_a_restored_config_runs_and_a_new_key_raises(tuner, monkeypatch):
    """Autotuner.run prunes before it asks check_disk_cache: pruning must not raise for a key
    whose config the cache restores; only a key that must be timed raises CaptureError."""
    tune(tuner)
    monkeypatch.setattr(capture, "capturing", lambda: True)
    tuner()
    tuned = autotuner()
    tuned.nargs = {"x_ptr": torch.zeros(4), "n": 4}
    pruned = tuned.prune_configs({})  # what Autotuner.run calls first, for a new key
    bench = Bench(tuned)
    assert tuned.check_disk_cache(TUNING_KEY, pruned, bench) and bench.calls == 0
    assert tuned.cache[TUNING_KEY] == CONFIGS[1]
    with pytest.raises(capture.CaptureError, match="launch config of _scale"):
        tuned.check_disk_cache((8192, "torch.bfloat16"), pruned, bench)
    assert bench.calls == 0


def test_one_config_is_not_recorded(tuner, tmp_path, monkeypatch):
    tuner()
    calls = []
    quick = autotuner(quick=True)
    quick.nargs = {"x_ptr": torch.zeros(4), "n": 4}
    monkeypatch.setattr(capture, "capturing", lambda: True)  # one config: nothing to time
    configs = quick.prune_configs({})
    assert len(configs) == 1 and not quick.timed
    assert not quick.check_disk_cache(TUNING_KEY, configs, lambda: calls.append(1))
    assert calls == [1] and not list((tmp_path / "cache").glob("tuning-*.json"))


def test_without_the_hook_every_process_times_and_capture_raises(monkeypatch):
    """The kernels alone (no lowrank_fused installing the hook) keep Triton's behaviour."""
    monkeypatch.setattr(kernels_autotuner, "choice_hook", None)
    tuned = autotuner()
    bench = Bench(tuned)
    assert not tuned.check_disk_cache(TUNING_KEY, CONFIGS, bench) and bench.calls == 1
    monkeypatch.setattr(capture, "capturing", lambda: True)
    with pytest.raises(capture.CaptureError):
        autotuner().check_disk_cache(TUNING_KEY, CONFIGS, bench)


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
    # what Autotuner.run passes on (KernelInterface.__getitem__ adds the grid and warmup=False)
    meta = {"HAS_DROPOUT": True, "grid": (8,), "warmup": False}
    assert parallel.precompile_configs(Launch(), CONFIGS, meta, workers=2)
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


def test_the_kernels_gemm_variant_choice_goes_through_the_hook(tuner, monkeypatch):
    """variants._auto (the kernels' tiled-or-TMA choice) on a GPU, as the kernels make it: the
    first process times the two variants and records the faster; a second process (a fresh
    in-process memo and Tuner) restores it without launching anything, under graph capture
    too, where a key never timed raises CaptureError."""
    import triton.testing
    monkeypatch.setattr(variants, "interpreting", lambda: False)
    monkeypatch.delenv("LOWRANK_FUSED_AUTOTUNE", raising=False)
    cost = {"tiled": 2.0, "tma": 1.0}
    launched = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **kwargs: (fn(), cost[launched[-1]])[1])
    gpu = torch.device("cuda", 0)
    key = (8192, 4096, 4096, 16)

    def choose(launch):
        return variants._auto("fused_linear", gpu, torch.bfloat16, key, launch)

    monkeypatch.setattr(variants, "_winners", {})
    tuner()
    assert choose(launched.append) == "tma" and set(launched) == {"tiled", "tma"}

    def must_not_launch(variant):
        raise AssertionError("a variant ran in the second process")
    monkeypatch.setattr(variants, "_winners", {})
    tuner()
    monkeypatch.setattr(capture, "capturing", lambda: True)
    assert choose(must_not_launch) == "tma"
    with pytest.raises(capture.CaptureError, match="GEMM variant of fused_linear"):
        variants._auto("fused_linear", gpu, torch.bfloat16, (16, 8, 8, 4), must_not_launch)
