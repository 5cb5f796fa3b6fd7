"""Choose the backend that computes the operator: "auto" | "reference" | "triton" | "cuda".

One choice, in stages, each named for it: ``requested_choice`` (the name asked for, after the
environment override), ``call_choice`` (what it means for one call on its device: a backend
name, or a policy tag), ``shape_choice`` (a policy tag made concrete for one shape), and
``backend_module`` (the module that runs it).

An explicit ``backend=`` argument wins; otherwise the environment variable
``LOWRANK_FUSED_BACKEND`` replaces the default "auto". "auto" picks a GPU backend for CUDA
tensors: when both are built, the one the measured per-shape policy (``lowrank_fused.policy``)
names, else Triton, else the CUDA extension; and the reference backend for anything else.
A 4-bit (bitsandbytes) weight has its own choice (``quantized_choice``): the Triton kernels that
dequantize W inside their K loops for "triton" and for "auto" on CUDA tensors; "cuda" takes them
too (the CUDA C++ backend has no 4-bit kernels); the reference backend otherwise. A DoRA call
(``dora_choice``) runs on Triton for "triton", for "auto" on CUDA tensors and for "cuda" (the CUDA
extension has no DoRA kernels: its calls go to Triton's); QDoRA (DoRA over a 4-bit weight) stays
on the reference.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

from . import policy
from ._numpy_check import check_numpy_for_triton_interpreter
from .errors import BackendUnavailableError

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
ENV_VAR = "LOWRANK_FUSED_BACKEND"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {backend!r}: expected one of {', '.join(BACKEND_NAMES)}"
            + (f" (check the {ENV_VAR} environment variable)" if os.environ.get(ENV_VAR) else "")
        )
    return backend


def _load_triton(device: torch.device) -> ModuleType:
    if not triton_available():
        raise BackendUnavailableError(
            "backend 'triton' needs the triton package: pip install triton (GPU), "
            "or use backend='reference'"
        )
    if device.type != "cuda" and not _triton_interpreting():
        raise BackendUnavailableError(
            f"backend 'triton' runs on CUDA tensors, got tensors on {device}; move them to a GPU, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
            "interpreter (slow; for tests)"
        )
    if _triton_interpreting():
        check_numpy_for_triton_interpreter()
    return importlib.import_module(".backends.triton", __package__)


def _load_cuda(device: torch.device) -> ModuleType:
    if not cuda_extension_available():
        raise BackendUnavailableError("backend 'cuda' " + _extension_unavailable_reason())
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        )
    return importlib.import_module(".backends.cuda", __package__)


def gpu_arch(device: torch.device) -> str:
    """"sm90" for H100/H200, "sm80" for A100, ...: the key of the measured policy."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


DEFAULT_KIND = "lora:forward+backward"

# The policy tag "auto:<method>:<mode>": a call choice that leaves the backend to the measured
# policy, per shape, inside the ops. It stays a string (torch.compile bakes strings into the
# graph and custom ops take them); it is built and parsed only here.
POLICY_TAG = "auto:"


def policy_tag(kind: str) -> str:
    """The tag for a call of ``kind`` = "<method>:<mode>" (see ``call_kind``)."""
    return POLICY_TAG + kind


def is_policy_tag(choice: str) -> bool:
    return choice.startswith(POLICY_TAG)


def parse_policy_tag(tag: str) -> tuple[str, str]:
    """(method, mode) of a policy tag; ValueError for anything else."""
    parts = tag.split(":")
    if len(parts) != 3 or parts[0] + ":" != POLICY_TAG:
        raise ValueError(f"expected a policy tag 'auto:<method>:<mode>', got {tag!r}")
    return parts[1], parts[2]


def _auto_on_cuda(kind: str) -> str:
    have_triton, have_cuda = triton_available(), cuda_extension_available()
    if have_triton and have_cuda:
        return policy_tag(kind)  # both built: the measured policy decides, per shape
    if have_triton:
        return "triton"
    return "cuda" if have_cuda else "reference"


# Under torch.compile the choice is made once, at trace time, and baked into the graph; it takes
# strings only, so dynamic shapes add no guard (the per-shape part runs inside the ops).
@torch.compiler.assume_constant_result
def call_choice(backend: str, device: torch.device, kind: str = DEFAULT_KIND) -> str:
    """What ``backend`` (after the env override) means on ``device``: "reference", "triton",
    "cuda", or, for "auto" on CUDA tensors with both GPU backends built, the tag
    "auto:<method>:<mode>" that the ops turn into a backend per shape with the measured policy
    (``kind`` is "<method>:<mode>" from ``call_kind``). Raises BackendUnavailableError if it
    cannot run."""
    name = requested_choice(backend)
    if device.type == "meta":  # any backend: shapes propagate through the reference ops
        return name if name != "auto" else "reference"
    if name == "auto":
        name = _auto_on_cuda(kind) if device.type == "cuda" else "reference"
    backend_module(name, device)  # fail now, with the reason, rather than inside the op
    return name


def quantized_choice(backend: str, device: torch.device) -> str:
    """The backend for a call over a 4-bit (bitsandbytes) weight: "triton" (the 4-bit GEMMs that
    dequantize W inside their K loops) or "reference" (W dequantized per call).

    - "triton": Triton (BackendUnavailableError where it cannot run, as for a dense weight);
    - "auto": Triton on CUDA tensors where it is installed, the reference otherwise (CPU tensors:
      the reference, as for a dense weight);
    - "cuda": the CUDA C++ backend has no 4-bit kernels, so after checking that it could run
      here, Triton's 4-bit path where Triton is installed, else the reference;
    - "reference": the reference.
    No measured policy: the CUDA C++ backend is never a contender for 4-bit weights."""
    name = requested_choice(backend)
    if device.type == "meta":
        return "reference"
    if name == "cuda":
        backend_module("cuda", device)  # fail now if what was asked could not run
        name = "triton" if triton_available() else "reference"
    elif name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton":
        backend_module("triton", device)
    return name


def dora_choice(backend: str, device: torch.device, four_bit: bool = False) -> str:
    """The backend for a DoRA call (``magnitude=``):

    - "triton": the Triton backend (triton_kernels/dora.py: c in the GEMM epilogues, the dm
      reduction in the pass over G);
    - "auto": on CUDA tensors Triton when it is installed (no measured policy for DoRA yet),
      else the reference; anything else, the reference;
    - "cuda": the Triton DoRA path. The CUDA C++ extension does not implement DoRA, so the
      call runs on Triton after checking that both could run here (a DoRA call with
      backend="cuda" needs the extension built, as every "cuda" call does, and triton);
    - "reference": the reference.

    ``four_bit`` (a bitsandbytes weight, QDoRA): the reference path whatever was asked for,
    after the same check that the backend asked for could run; the GPU kernels do not
    dequantize inside their K loop for DoRA."""
    name = requested_choice(backend)
    if device.type == "meta":  # shapes only: the reference ops propagate them
        return "reference"
    if four_bit:
        if name in ("triton", "cuda"):
            backend_module(name, device)
        return "reference"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "cuda":
        backend_module("cuda", device)  # raises with the reason when the extension cannot run
        backend_module("triton", device)
        return "triton"
    backend_module(name, device)
    return name


def call_kind(x, weight, lora_a, lora_b, latent) -> str:
    """"<method>:<mode>" of one call, for the measured policy: the method by which adapters
    train (lora, lora_fa, lora_xs), the mode "forward+backward" when autograd will run."""
    trains = [t is not None and t.requires_grad for t in (lora_a, lora_b, latent)]
    method = "lora" if trains[0] else ("lora_fa" if trains[1] else
                                       ("lora_xs" if trains[2] else "lora"))
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or any(trains))
    return f"{method}:{'forward+backward' if grads else 'forward'}"


def shape_choice(tag: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
                 r: int) -> str:
    """The backend a policy tag means for one shape: the measured winner, else "triton"."""
    method, mode = parse_policy_tag(tag)
    dtype_name = str(dtype).replace("torch.", "")
    choice = policy.choose(gpu_arch(device), dtype_name, method, mode, m, n, k, r)
    return choice or "triton"


def backend_module(name: str, device: torch.device, shape: Optional[tuple] = None) -> ModuleType:
    """The backend module for a name from ``call_choice`` on ``device``; a policy tag needs
    ``shape`` = (dtype, M, N, K, r) and checks only the fallback without it."""
    if device.type == "meta":  # no data, only shapes: the reference ops propagate them
        return _reference_module()
    if is_policy_tag(name):
        name = shape_choice(name, device, *shape) if shape is not None else "triton"
    if name == "triton":
        return _load_triton(device)
    if name == "cuda":
        return _load_cuda(device)
    return _reference_module()


@functools.lru_cache(maxsize=None)
def _reference_module() -> ModuleType:
    return importlib.import_module(".backends.pytorch", __package__)
