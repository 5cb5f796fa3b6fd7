"""Choose the backend that runs one call of the operator: ``select``, the one place a choice is
made.

``select`` takes the call's properties (the backend asked for, the device, the dtype, the shape,
a 4-bit weight or not, DoRA or not, the method and mode) and returns the backend module that runs
it (``backends/``). The ops call it at run time, inside their bodies, so under torch.compile the
choice is made per call on the real shapes without a guard or a recompile; a choice that needs
more of the call (a timed one) belongs here too.

An explicit ``backend=`` argument wins; otherwise the environment variable
``LOWRANK_FUSED_BACKEND`` replaces the default "auto". What each name means:

- "reference": the PyTorch backend (``backends/pytorch.py``), on any device.
- "triton": the Triton kernels, on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
  QDoRA (DoRA over a 4-bit weight) runs on the PyTorch backend: the kernels do not dequantize
  inside their K loops for DoRA.
- "cuda": the CUDA C++ extension. It has no DoRA and no 4-bit kernels: after checking that it
  could run here, a DoRA call runs on Triton (which must then be installed), a 4-bit call on
  Triton where it is installed and on the PyTorch backend otherwise, QDoRA on the PyTorch backend.
- "auto": on CUDA tensors, a dense plain call takes the measured per-shape policy
  (``lowrank_fused.policy``) when both GPU backends are built (Triton where the policy has no
  entry), else whichever GPU backend is built; a DoRA or 4-bit call takes Triton where installed
  (no measured policy for them); QDoRA and anything not on CUDA take the PyTorch backend.
- Meta tensors: the PyTorch backend whatever was asked (its ops propagate shapes).

Asking for a backend that cannot run here raises ``BackendUnavailableError`` saying how to get it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Optional

import torch

from . import _env, policy
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


def gpu_arch(device: torch.device) -> str:
    """"sm90" for H100/H200, "sm80" for A100, ...: the key of the measured policy."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


DEFAULT_KIND = "lora:forward+backward"


def parse_kind(kind: str) -> tuple[str, str]:
    """(method, mode) of a call kind "<method>:<mode>" (``functional.call_kind``); ValueError
    for anything else."""
    parts = kind.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected a call kind '<method>:<mode>', got {kind!r}")
    return parts[0], parts[1]


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def select(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
           shape: Optional[tuple] = None, kind: str = DEFAULT_KIND, four_bit: bool = False,
           dora: bool = False) -> ModuleType:
    """The backend module that runs one call (see the module docstring for the rules).

    Args:
        backend: "auto", "reference", "triton" or "cuda" as the caller asked.
        device: the tensors' device.
        dtype, shape: the base dtype and (M, N, K, r): what the measured policy is keyed on
            (read only for "auto" on CUDA tensors with both GPU backends built).
        kind: "<method>:<mode>" (lora / lora_fa / lora_xs, forward / forward+backward).
        four_bit: W is a 4-bit (bitsandbytes) weight. dora: a DoRA call (a magnitude).

    Raises:
        ValueError: an unknown backend name. BackendUnavailableError: it cannot run here."""
    if backend == "reference":
        return _REFERENCE
    name = requested_choice(backend)
    if name == "reference" or device.type == "meta":
        return _REFERENCE
    if name == "auto":
        if not _on_gpu(device) or (four_bit and dora):
            return _REFERENCE
        if four_bit or dora:
            return _load_triton(device) if triton_available() else _REFERENCE
        return _auto_dense(device, dtype, shape, kind)
    module = _load_triton(device) if name == "triton" else _load_cuda(device)
    if four_bit and dora:
        return _REFERENCE
    if name == "cuda" and dora:
        return _load_triton(device)
    if name == "cuda" and four_bit:
        return _load_triton(device) if triton_available() else _REFERENCE
    return module


def _auto_dense(device, dtype, shape, kind) -> ModuleType:
    """"auto" for a dense plain call on a CUDA device."""
    have_triton, have_cuda = triton_available(), cuda_extension_available()
    if have_triton and have_cuda:
        winner = None
        if dtype is not None and shape is not None:
            method, mode = parse_kind(kind)
            m, n, k, r = shape
            winner = policy.choose(gpu_arch(device), str(dtype).replace("torch.", ""), method,
                                   mode, m, n, k, r)
        return _load_cuda(device) if winner == "cuda" else _load_triton(device)
    if have_triton:
        return _load_triton(device)
    return _load_cuda(device) if have_cuda else _REFERENCE


_REFERENCE = _backend_module("pytorch")
