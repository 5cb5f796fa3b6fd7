"""Choose the backend that runs one call of the operator: ``select``, the one place a choice is
made.

``select`` takes the call's properties (the backend asked for, the device, the dtype, the shape,
a 4-bit weight or not, DoRA or not, the pass, and for "auto" on a GPU the rest of the call's key
and a way to run it) and returns the backend module that runs it (``backends/``). The ops call it at run time, inside their bodies, so under torch.compile the
choice is made per call on the real shapes without a guard or a recompile; a choice that needs
more of the call (the timed one of "auto") is made here too.

An explicit ``backend=`` argument wins; otherwise the environment variable
``LOWRANK_FUSED_BACKEND`` replaces the default "auto". What each name means:

- "reference": the PyTorch backend (``backends/pytorch.py``), on any device.
- "triton": the Triton kernels, on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
  QDoRA (DoRA over a 4-bit weight) runs on the PyTorch backend: the kernels do not dequantize
  inside their K loops for DoRA.
- "cuda": the CUDA C++ extension. It has no DoRA and no 4-bit kernels: after checking that it
  could run here, a DoRA call runs on Triton (which must then be installed), a 4-bit call on
  Triton where it is installed and on the PyTorch backend otherwise, QDoRA on the PyTorch backend.
- "auto": on CUDA tensors, per key (the pass, forward and backward apart; dtypes; method and
  flags; M bucketed to a power of two; N, K, r: ``tuning.TuningKey``) the fastest of the
  ``contenders``: Triton, the CUDA extension where built (plain calls only), and the reference
  (cuBLAS with the same memory saving: the saved tensors are decided by the ops, whichever
  backend runs), timed once on the call's first use of its key and remembered in the local
  tuning cache, or taken from the shipped table (``lowrank_fused.tuning``;
  ``lowrank_fused.tuning_report()`` lists each choice). Untimed (a recorded choice, else the
  first fused contender) under ``LOWRANK_FUSED_AUTOTUNE=quick`` and deterministic algorithms;
  under CUDA graph capture a key not decided yet raises CaptureError. QDoRA and anything not
  on CUDA take the PyTorch backend at once (the tuning machinery is never touched).
- Meta tensors: the PyTorch backend whatever was asked (its ops propagate shapes).

Asking for a backend that cannot run here raises ``BackendUnavailableError`` saying how to get it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Callable, NamedTuple, Optional

import torch

from . import _env
from ._numpy_check import check_numpy_for_triton_interpreter
from .errors import BackendUnavailableError

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
ENV_VAR = "LOWRANK_FUSED_BACKEND"


_env_backend = _env.reader(ENV_VAR)
_env_interpret = _env.reader("TRITON_INTERPRET")


def _triton_interpreting() -> bool:
    return (_env_interpret() or "0") != "0"


@functools.lru_cache(maxsize=None)  # a package lookup on disk: once per process
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _extension_load_error() -> Optional[str]:
    """Why lowrank_fused._C cannot be imported, or None when it can (tried once per process)."""
    try:
        importlib.import_module("lowrank_fused._C")
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def cuda_extension_available() -> bool:
    return _extension_load_error() is None


def _extension_unavailable_reason() -> str:
    """The cause, kept: "not built", or built but failing to load (with both torch versions,
    since a torch upgrade after the build is the usual cause)."""
    cause = _extension_load_error()
    if importlib.util.find_spec("lowrank_fused._C") is None:
        return ("needs the compiled extension lowrank_fused._C, which is not built: on a machine "
                "with nvcc and a CUDA build of torch run "
                "LOWRANK_FUSED_BUILD_CUDA=1 pip install -e . --no-build-isolation")
    try:
        built_with = importlib.import_module("._build_info", __package__).TORCH_VERSION
    except (ImportError, AttributeError):
        built_with = "unknown (no lowrank_fused/_build_info.py)"
    return (f"found lowrank_fused._C but could not load it ({cause}); it was built against "
            f"torch {built_with}, this process runs torch {torch.__version__}: rebuild with "
            "LOWRANK_FUSED_BUILD_CUDA=1 pip install -e . --no-build-isolation")


def available_backends() -> list[str]:
    """Names of the backends usable in this process (tensor device aside)."""
    names = ["reference"]
    if triton_available():
        names.append("triton")
    if cuda_extension_available():
        names.append("cuda")
    return names


def requested_choice(backend: str) -> str:
    """Apply the environment override to the default and check the name."""
    if backend == "auto":
        backend = _env_backend() or "auto"
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_NAMES)}"
            + (f" (check the {ENV_VAR} environment variable)" if _env_backend() else "")
        )
    return backend


def _load_triton(device: torch.device) -> ModuleType:
    if not triton_available():
        raise BackendUnavailableError(
            "backend 'triton' needs the triton package: pip install triton (GPU), "
            "or use backend='reference'"
        )
    interpreting = _triton_interpreting()
    if device.type != "cuda" and not interpreting:
        raise BackendUnavailableError(
            f"backend 'triton' runs on CUDA tensors, got tensors on {device}; move them to a GPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
            "interpreter (slow; for tests)"
        )
    if interpreting:
        check_numpy_for_triton_interpreter()
    return _backend_module("triton")


def _load_cuda(device: torch.device) -> ModuleType:
    if not cuda_extension_available():
        raise BackendUnavailableError("backend 'cuda' " + _extension_unavailable_reason())
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        )
    return _backend_module("cuda")


@functools.lru_cache(maxsize=None)  # imported once: the lookup would cost each call
def _backend_module(name: str) -> ModuleType:
    return importlib.import_module(f".backends.{name}", __package__)


def _on_gpu(device_type: str) -> bool:
    """Whether "auto" treats the call as a GPU's (the tests make the CPU stand in for one)."""
    return device_type == "cuda"


class CallDetails(NamedTuple):
    """What "auto" on a GPU needs of a call beyond ``select``'s arguments, asked for only there
    (``select``'s ``details``): the adapters' dtype, the method by which the adapters train
    (``tuning.key.METHODS``; "lora" for every forward: its kernels do the same work for all
    three), the flags of its key (``tuning.key.FLAGS``), and ``run(module)``, which runs this
    very call on a backend module, unchecked, its result discarded (what timing runs)."""

    adapter_dtype: torch.dtype
    method: str
    flags: tuple
    run: Callable[[ModuleType], object]


def select(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
           shape: Optional[tuple] = None, four_bit: bool = False, dora: bool = False,
           op: str = "forward", details: Optional[tuple] = None) -> ModuleType:
    """The backend module that runs one call (see the module docstring for the rules).

    Args:
        backend: "auto", "reference", "triton" or "cuda" as the caller asked.
        device: the tensors' device.
        dtype, shape: the base (compute) dtype and (M, N, K, r): with ``op`` and ``details``
            what "auto" on CUDA tensors keys its timed choice on (read only there).
        four_bit: W is a 4-bit (bitsandbytes) weight. dora: a DoRA call (a magnitude).
        op: the pass, "forward" or "backward" ("auto" chooses each apart).
        details: (function, arguments): ``function(*arguments)`` returns the call's
            ``CallDetails`` (called only by "auto" on CUDA tensors; a pair rather than a
            closure, which would cost every call); without it (or without ``shape``) "auto" on
            CUDA tensors takes its first fused contender, untimed.

    Raises:
        ValueError: an unknown backend name. BackendUnavailableError: it cannot run here.
        CaptureError: "auto" meets a key not decided yet while a CUDA graph is captured."""
    if backend == "reference":
        return _REFERENCE
    name = requested_choice(backend)
    device_type = device.type  # a property that builds a new string each time: read once
    if name == "reference" or device_type == "meta":
        return _REFERENCE
    if name == "auto":
        if not _on_gpu(device_type):
            return _REFERENCE
        return _auto_on_gpu(device, dtype, shape, four_bit, dora, op, details)
    module = _load_triton(device) if name == "triton" else _load_cuda(device)
    if four_bit and dora:
        return _REFERENCE
    if name == "cuda" and dora:
        return _load_triton(device)
    if name == "cuda" and four_bit:
        return _load_triton(device) if triton_available() else _REFERENCE
    return module


def contenders(four_bit: bool = False, dora: bool = False) -> tuple:
    """The backends "auto" times against each other on CUDA tensors, fused first: Triton where
    installed, the CUDA extension where built (plain calls only: it has no DoRA or 4-bit
    kernels), and always the reference (cuBLAS with the same memory saving). QDoRA: the
    reference alone."""
    if four_bit and dora:
        return ("reference",)
    names = ["triton"] if triton_available() else []
    if not (four_bit or dora) and cuda_extension_available():
        names.append("cuda")
    return (*names, "reference")


def describe(backend: str, device: torch.device) -> str:
    """What ``backend`` means on ``device`` in words: a backend name, or for "auto" on a GPU
    "auto (timed per shape: triton, cuda, reference)" (the contenders of a plain call)."""
    name = requested_choice(backend)
    if name == "auto" and _on_gpu(device.type):
        names = contenders()
        if len(names) > 1:
            return f"auto (timed per shape: {', '.join(names)})"
    return select(backend, device).NAME


def _module(name: str, device: torch.device) -> ModuleType:
    if name == "triton":
        return _load_triton(device)
    return _load_cuda(device) if name == "cuda" else _REFERENCE


_env_autotune = _env.reader("LOWRANK_FUSED_AUTOTUNE")


def _untimed_reason(m: int) -> Optional[str]:
    """Why this call may not be timed (then a recorded choice, else the first fused contender),
    or None."""
    if _env_autotune() == "quick":  # correctness runs: the kernels, no timing
        return "LOWRANK_FUSED_AUTOTUNE=quick"
    if torch.are_deterministic_algorithms_enabled():
        # timing noise could pick either backend from run to run, and they round differently
        return "deterministic algorithms"
    if m == 0:
        return "an empty batch"
    return None


# (tuner, device, pass, dtype, adapter dtype, method, flags, 4-bit, DoRA, M bucket, N, K, r) ->
# the module of the winner the tuner settled: each later call's lookup, without building a
# TuningKey (~5 us) or checking the backend again
_settled: dict = {}


def _auto_on_gpu(device, dtype, shape, four_bit, dora, op, details) -> ModuleType:
    """"auto" on a CUDA device: the fastest contender for this call's key, timed once
    (``lowrank_fused.tuning``)."""
    names = contenders(four_bit, dora)
    if len(names) == 1 or shape is None or details is None or dtype is None:
        return _module(names[0], device)
    from . import tuning  # with its first use: "import lowrank_fused" stays light
    call = details[0](*details[1])
    m, n, k, r = shape
    tuner = tuning.tuner()
    settled = (tuner, device, op, dtype, call.adapter_dtype, call.method, call.flags, four_bit,
               dora, 1 << max(m - 1, 0).bit_length(), n, k, r)
    module = _settled.get(settled)
    if module is not None:
        return module
    flags = (*call.flags, *(("dora",) if dora else ()), *(("4bit",) if four_bit else ()))
    try:
        key = tuning.TuningKey.of(op, dtype, call.adapter_dtype, call.method, m, n, k, r, flags)
    except ValueError:  # a dtype the key has no name for: nothing to look up or record
        return _module(names[0], device)
    winner = tuner.decide(key, {name: functools.partial(call.run, _module(name, device))
                                for name in names},
                          device=device, default=names[0], untimed=_untimed_reason(m))
    module = _module(winner, device)
    if tuner.decided(key, device) == winner:  # settled (an untimed default is not)
        _settled[settled] = module
    return module


_REFERENCE = _backend_module("pytorch")
