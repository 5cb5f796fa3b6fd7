"""What a GPU run's kernel choices cost and key on (autotuner.launcher, variants.py), tested on the
CPU: the GPU path's autotuner runs over the interpreter with its timing faked, and the variant
choice with fake launches and a fake do_bench."""
import types
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed")

import triton  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature  # noqa
from lowrank_fused.backends import triton as _backend  # noqa: E402,F401 (installs the hooks)
from lowrank_fused.dropout import keep_mask, quantised_p  # noqa: E402
from lowrank_fused.triton_kernels import (autotune_mode, autotuner, backward,  # noqa: E402
                                          configs, dora, dropout, fit, forward, interpreter,
                                          persistent, variants)

pytestmark = pytest.mark.skipif(not interpreter.interpreting(), reason="fakes the GPU path on CPU")

@pytest.fixture(autouse=True)
def new_process_tuning(tmp_path):
    """Each test's kernel choices as a new process makes them: the Triton backend's hooks send
    them through lowrank_fused.tuning, here over an empty cache of the test's own."""
    from lowrank_fused import tuning
    from lowrank_fused.tuning.environment import Environment
    h100 = Environment("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", "12.4", "2.11.0", "3.6.0",
                       "0.1.0", "0123456789abcdef")
    tuning.configure(cache_dir=tmp_path / "tuning", table=tmp_path / "no-table.json",
                     environment=h100)
    yield
    tuning.configure()


SEEDED_KERNELS = [forward._project_kernel, backward._grad_input_kernel, backward._grad_a_kernel,
                  dropout._keep_mask_kernel, dora._dora_grad_input_kernel]


# --- autotune keys ---------------------------------------------------------------------------

def _recorded_launches(monkeypatch):
    """[(kernel, key, launch kwargs)] of a forward and every backward, with and without dropout,
    tiled and TMA, each launch recorded instead of run (meta tensors)."""
    from lowrank_fused.backends import triton as backend
    from lowrank_fused.dropout import DropoutSpec
    launches = []

    def fake_launcher(kernel, family, key, reset_to_zero=None):
        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, list(key), kwargs))
        return Launch(), {}

    for module in (forward, backward, persistent):
        monkeypatch.setattr(module, "launcher", fake_launcher)
    m, k, n, r = 64, 64, 48, 8
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, weight, bias = torch.empty(m, k, **meta), torch.empty(n, k, **meta), torch.empty(n, **meta)
    lora_a, lora_b = torch.empty(r, k, **meta), torch.empty(n, r, **meta)
    for gemm in ("tiled", "tma"):
        monkeypatch.setenv(variants.ENV, gemm)
        for spec in (None, DropoutSpec(0.25, 7)):
            _, p = backend.forward(x, weight, bias, lora_a, lora_b, 0.5, spec)
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic)
                try:
                    backend.backward(torch.empty(m, n, **meta), x, p, weight, lora_a, lora_b,
                                     0.5, spec, need_x=True, need_a=True, need_b=True,
                                     need_bias=True)
                finally:
                    torch.use_deterministic_algorithms(False)
    return launches


def test_autotune_keys_name_every_constexpr_of_the_launch(monkeypatch):
    # A flag left out of the key lets a launch reuse a config tuned (and pruned) for another
    # kernel: a dropout-off tuning would serve the dropout kernel, past its spill pruning.
    launches = _recorded_launches(monkeypatch)
    names = {kernel.fn.__name__ for kernel, _, _ in launches}
    assert names == {"_project_kernel", "_fused_linear_kernel", "_grad_output_pass_kernel",
                     "_grad_input_kernel", "_grad_a_kernel", "_grad_b_kernel",
                     "_fused_linear_tma_kernel", "_grad_input_tma_kernel"}
    for kernel, key, kwargs in launches:
        name = kernel.fn.__name__
        assert set(key) <= set(kernel.arg_names), name  # the autotuner drops unknown names
        assert set(kwargs) <= set(key), (name, set(kwargs) - set(key))


@pytest.fixture
def gpu_path(monkeypatch):
    """autotuner.launcher as on an H100 (the autotuner over sm90 configs), kernels still on the
    interpreter; timing faked: each config takes 1 / BLOCK_N (the widest wins)."""
    monkeypatch.setattr(autotuner, "interpreting", lambda: False)
    monkeypatch.setattr(autotuner, "config_family", lambda: "sm90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(autotuner, "_tuned", {})
    monkeypatch.delenv(autotune_mode.AUTOTUNE_ENV, raising=False)
    timed = []

    def fake_bench(self, *args, config, **meta):
        timed.append(config)
        return [1.0 / config.kwargs["BLOCK_N"]] * 3

    monkeypatch.setattr(Autotuner, "_bench", fake_bench)
    return timed


def _project(p_drop=0.0, m=8, k=64, r=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, dtype=torch.bfloat16)
    a = torch.randn(r, k, generator=g, dtype=torch.bfloat16)
    forward.project(x, a, seed=3, p_drop=p_drop)


def _project_tuner():
    [tuner] = [t for (kernel, *_), t in autotuner._tuned.items()
               if kernel is forward._project_kernel]
    return tuner


def test_a_dropout_call_does_not_reuse_the_plain_calls_config(gpu_path):
    limit = fit.shared_memory_limit((9, 0))
    _project(p_drop=0.0)
    plain = _project_tuner().best_config
    assert plain.kwargs["BLOCK_N"] == 256  # the fake timing's winner: pruned with dropout
    _project(p_drop=0.25)
    chosen = _project_tuner().best_config
    assert fit.fits(chosen, "skinny", 2, 16, limit, "sm90", dropout=True), chosen
    assert len(_project_tuner().cache) == 2


# --- LOWRANK_FUSED_AUTOTUNE ----------------------------------------------------------------

def test_quick_mode_takes_the_first_fitting_config_untimed(gpu_path, monkeypatch):
    _project()  # full: times the fitting configs, the widest wins
    assert gpu_path and _project_tuner().best_config.kwargs["BLOCK_N"] == 256
    gpu_path.clear()
    monkeypatch.setenv(autotune_mode.AUTOTUNE_ENV, "quick")
    _project()  # the same key: quick must not reuse the full tuner's winner
    quick = [t for t in autotuner._tuned.values() if t.quick]
    assert len(quick) == 1 and not gpu_path
    first = fit.fitting_configs(configs.SKINNY_CONFIGS["sm90"], "skinny", 2, 16,
                                fit.shared_memory_limit((9, 0)), "sm90")[0]
    assert quick[0].best_config == first


def test_one_fitting_config_is_not_timed(gpu_path, monkeypatch):
    monkeypatch.setattr(autotuner, "fitting_configs", lambda configs_, *args: configs_[:1])
    _project()
    assert not gpu_path


@pytest.mark.parametrize("value", ["fast", "FULL", "0"])
def test_a_bad_autotune_mode_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(autotune_mode.AUTOTUNE_ENV, value)
    with pytest.raises(ValueError, match=rf"LOWRANK_FUSED_AUTOTUNE.*'full', 'quick'.*'{value}'"):
        _project()


def test_autotune_mode_default_is_full(monkeypatch):
    monkeypatch.delenv(autotune_mode.AUTOTUNE_ENV, raising=False)
    assert autotune_mode.autotune_mode() == "full"
    monkeypatch.setenv(autotune_mode.AUTOTUNE_ENV, "quick")
    assert autotune_mode.autotune_mode() == "quick"


# --- graph capture -----------------------------------------------------------------------------

@pytest.fixture
def capturing(monkeypatch):
    """Makes torch report a CUDA graph capture in progress; returns a switch to end it."""
    state = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def test_no_autotuning_under_graph_capture(gpu_path, capturing, monkeypatch):
    with pytest.raises(RuntimeError, match="run one step .*before capture"):
        _project()
    assert not gpu_path
    capturing["on"] = False
    _project()  # the eager step tunes this key
    capturing["on"] = True
    gpu_path.clear()
    _project()  # under capture the cached choice runs
    assert not gpu_path
    monkeypatch.setenv(autotune_mode.AUTOTUNE_ENV, "quick")
    _project(m=300)  # quick: one config, a new key is no timing
    assert not gpu_path


# --- variants.py: "auto" ---------------------------------------------------------------------

@pytest.fixture
def auto(monkeypatch):
    """variants.use_tma("auto") as on an H100 for fake CUDA operands; do_bench times fake
    launches by ``auto.times``. Returns a namespace: choose(dtype), launches, times."""
    import triton.testing
    state = types.SimpleNamespace(launches=[], times={"tiled": 2.0, "tma": 1.0}, fail=set())
    monkeypatch.setattr(variants, "interpreting", lambda: False)
    monkeypatch.setattr(variants, "describable", lambda *tensors: True)
    monkeypatch.setattr(variants, "tma_supported", lambda device: True)
    monkeypatch.setattr(variants, "_winners", {})
    monkeypatch.delenv(variants.ENV, raising=False)
    monkeypatch.delenv(autotune_mode.AUTOTUNE_ENV, raising=False)

    def launch(variant):
        state.launches.append(variant)
        if variant in state.fail:
            raise RuntimeError(f"{variant} failed")

    def do_bench(fn, warmup, rep):
        fn()
        return state.times[state.launches[-1]]

    def choose(dtype=torch.bfloat16, key=(64, 32, 32, 8)):
        operand = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
        tma = variants.use_tma("fused_linear", (operand,) * 3, None, launch, key)
        return "tma" if tma else "tiled"

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    state.choose = choose
    return state


def test_auto_times_once_per_key(auto):
    assert auto.choose() == "tma" and auto.launches
    auto.launches.clear()
    assert auto.choose() == "tma" and not auto.launches


def test_auto_winner_is_per_base_dtype(auto):
    assert auto.choose(torch.bfloat16) == "tma"
    auto.times = {"tiled": 1.0, "tma": 2.0}
    assert auto.choose(torch.float16) == "tiled"


def test_a_failing_variant_leaves_the_other(auto):
    auto.fail = {"tma"}
    with pytest.warns(RuntimeWarning, match="'tma' GEMM variant failed"):
        assert auto.choose(torch.bfloat16) == "tiled"
    auto.fail = {"tiled"}
    with pytest.warns(RuntimeWarning, match="'tiled' GEMM variant failed"):
        assert auto.choose(torch.float16) == "tma"
    auto.fail = {"tiled", "tma"}
    with pytest.raises(RuntimeError, match="tiled failed"):  # a new key: nothing cached
        auto.choose(torch.bfloat16, key=(128, 32, 32, 8))


def test_quick_mode_picks_tiled_untimed(auto, monkeypatch):
    monkeypatch.setenv(autotune_mode.AUTOTUNE_ENV, "quick")
    assert auto.choose() == "tiled" and not auto.launches


def test_deterministic_algorithms_pick_tiled_untimed(auto):
    torch.use_deterministic_algorithms(True)
    try:
        assert auto.choose() == "tiled" and not auto.launches
    finally:
        torch.use_deterministic_algorithms(False)


def test_no_variant_timing_under_graph_capture(auto, capturing):
    with pytest.raises(RuntimeError, match="run one step .*before capture"):
        auto.choose()
    assert not auto.launches
    capturing["on"] = False
    assert auto.choose() == "tma"
    capturing["on"] = True
    auto.launches.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auto.choose() == "tma" and not auto.launches  # cached before capture


# --- the dropout seed ------------------------------------------------------------------------

SEEDS = [3, 16, 1, 2 ** 31, 2 ** 31 + 16, 2 ** 32 + 32, 2 ** 63 + 16, -16]


def _arg(param, seed):
    if param.name == "seed":
        return dropout.seed_arg(seed)
    if param.name.endswith("_ptr"):
        return MockTensor(torch.float16)
    return 32 if param.is_constexpr or param.name.isupper() or "stride" in param.name else 0.5


@pytest.mark.parametrize("kernel", SEEDED_KERNELS, ids=lambda k: k.fn.__name__)
def test_no_seed_compiles_the_kernel_again(kernel):
    # The GPU binder's specialisation of the seed argument (what picks a compiled kernel): the
    # same for every seed, so a seed that is 1, a multiple of 16 or >= 2**31 compiles nothing.
    jit = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs["do_not_specialize"])
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    at = [p.name for p in jit.params].index("seed")
    keys = {repr(binder(*[_arg(p, seed) for p in jit.params])[1][at]) for seed in SEEDS}
    assert len(keys) == 1, keys


@pytest.mark.parametrize("seed", SEEDS)
def test_the_kernels_mask_keeps_any_seeds_low_32_bits(seed):
    p = quantised_p(0.5)
    got = dropout.dropout_keep_mask(seed, p, (5, 70), "cpu")
    assert torch.equal(got, keep_mask(seed, p, torch.arange(5), torch.arange(70)))
