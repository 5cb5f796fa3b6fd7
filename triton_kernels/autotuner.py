"""The launcher every kernel goes through: under the interpreter the raw kernel at one fixed
config; on a GPU an autotuner over its family's fitting configs (fit.py), per shape key, timed
or by rule as ``LOWRANK_FUSED_AUTOTUNE`` says (autotune_mode.py), never timed under CUDA graph
capture (capture.py); the choice goes through ``choice_hook``, which the Triton backend sets to
remember it across processes."""
import torch
import triton

from .autotune_mode import autotune_mode
from .capture import check_not_capturing
from .configs import CONFIGS, interpreter_config
from .fit import fitting_configs, shared_memory_limit
from .interpreter import interpreting


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the autotuners' key, so a new token count (they vary from
    step to step) reuses the configs tuned for its bucket instead of tuning again."""
    return triton.next_power_of_2(m)


def config_family() -> str:
    """Which config list suits this GPU: "sm90" (Hopper and later) or "sm80". Not dispatch's
    "generation", which names the exact architecture."""
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80"


def _pruner(family: str):
    """early_config_prune for triton.autotune: drops configs over the shared-memory limit before
    any is compiled (the autotuner would only skip them after a failed compile)."""
    def prune(configs, named_args, **kwargs):
        base = named_args.get("x_ptr", named_args.get("g_ptr"))
        capability = torch.cuda.get_device_capability(base.device)
        return fitting_configs(configs, family, base.element_size(),
                               kwargs.get("RANK_BLOCK", 16), shared_memory_limit(capability),
                               "sm90" if capability[0] >= 9 else "sm80",
                               bool(kwargs.get("HAS_DROPOUT", False)))
    return prune


choice_hook = None
"""Set by the Triton backend (lowrank_fused.tuning.autotune.restore_or_tune): called as
``choice_hook(autotuner, tuning_key, configs, bench)`` for a key not tuned in this process, it
sets ``autotuner.cache[tuning_key]`` (from its own record, else by calling ``bench``) and
returns whether the config was restored. None: every key is timed in every process."""


class _Autotuner(triton.runtime.Autotuner):
    """triton's Autotuner with "quick" mode (the first fitting config), no timing where one
    config is left (Triton 3.6 would still time it), the choice made through ``choice_hook``
    (persisted), and no timing under graph capture (a choice restored without timing runs)."""

    def __init__(self, kernel, configs, key, reset_to_zero, prune, quick: bool):
        super().__init__(kernel, kernel.arg_names, configs, key, reset_to_zero, None,
                         prune_configs_by={"early_config_prune": prune})
        self.quick = quick
        self.timed = True
        # an attribute, not the keyword (older Tritons have neither it nor the hook): Autotuner.run
        # then asks check_disk_cache for a key it has not tuned in this process
        self.cache_results = True

    def prune_configs(self, kwargs):
        """Only called for a key not tuned yet (and by warmup)."""
        self.last_meta = dict(kwargs)  # the launch's meta-parameters: the hook precompiles with them
        pruned = super().prune_configs(kwargs)
        if self.quick:
            pruned = pruned[:1]
        self.timed = len(pruned) > 1
        return pruned

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        """Triton's hook for a key not tuned in this process (Autotuner.run, after pruning)."""
        if choice_hook is not None:
            return choice_hook(self, tuning_key, configs, bench_fn)
        if len(configs) > 1:
            check_not_capturing(f"the launch config of {self.base_fn.__name__}")
        bench_fn()
        return False

    def _bench(self, *args, config, **meta):
        if not self.timed:  # nothing to choose between: timing would only run the kernel
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


_tuned = {}  # (kernel, family, config list, mode) -> its _Autotuner


def launcher(kernel, family: str, key, reset_to_zero=None):
    """(callable kernel, fixed meta-parameters) for this machine: under the interpreter the raw
    kernel and one small config; on a GPU an autotuner over the config family's configs that fit
    (``fitting_configs``), keyed by ``key`` (shape and the constexpr flags that change the
    compiled kernel), with nothing fixed; ``LOWRANK_FUSED_AUTOTUNE`` picks full or quick tuning.
    ``family``: a key of configs.CONFIGS."""
    mode = autotune_mode()  # checked on every machine, so a bad value fails in CPU tests too
    if interpreting():
        return kernel, interpreter_config(family)
    configs_of = config_family()
    cache_key = (kernel, family, configs_of, mode)  # a mode changed mid-process: its own tuner
    if cache_key not in _tuned:
        _tuned[cache_key] = _Autotuner(kernel, CONFIGS[family][configs_of], key, reset_to_zero,
                                       _pruner(family), quick=mode == "quick")
    return _tuned[cache_key], {}
