"""Choose the backend that computes the operator: "auto" | "reference" | "triton" | "cuda".

An explicit ``backend=`` argument wins; otherwise the environment variable
``LOWRANK_FUSED_BACKEND`` replaces the default "auto". "auto" picks a built GPU backend for CUDA
tensors (Triton, until measured figures back a per-shape choice of the CUDA extension) and the
reference backend for anything else.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from .errors import BackendUnavailableError

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")
ENV_VAR = "LOWRANK_FUSED_BACKEND"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_extension_available() -> bool:
    try:
        importlib.import_module("lowrank_fused._C")
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """Names of the backends usable in this process (tensor device aside)."""
    names = ["reference"]
    if triton_available():
        names.append("triton")
    if cuda_extension_available():
        names.append("cuda")
    return names


def requested_backend(backend: str) -> str:
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
    return importlib.import_module(".backends.triton", __package__)


def _load_cuda(device: torch.device) -> ModuleType:
    if not cuda_extension_available():
        raise BackendUnavailableError(
            "backend 'cuda' needs the compiled extension lowrank_fused._C, which is not built: "
            "on a machine with nvcc and a CUDA build of torch run "
            "LOWRANK_FUSED_BUILD_CUDA=1 pip install -e . --no-build-isolation"
        )
    if device.type != "cuda":
        raise BackendUnavailableError(
            f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        )
    return importlib.import_module(".backends.cuda", __package__)


# Under torch.compile the choice is made once, at trace time, and baked into the graph.
@torch.compiler.assume_constant_result
def resolved_name(backend: str, device: torch.device) -> str:
    """The concrete backend ("reference", "triton" or "cuda") that ``backend`` (after the env
    override) means on ``device``; raises BackendUnavailableError if it cannot run there."""
    name = requested_backend(backend)
    if name == "auto":
        # Triton first: no per-shape cuda-vs-triton figures have been measured yet.
        if device.type == "cuda" and triton_available():
            name = "triton"
        elif device.type == "cuda" and cuda_extension_available():
            name = "cuda"
        else:
            name = "reference"
    resolve(name, device)  # fail now, with the reason, rather than inside the op
    return name


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for a concrete backend name on ``device``."""
    if name == "triton":
        return _load_triton(device)
    if name == "cuda":
        return _load_cuda(device)
    return importlib.import_module(".backends.reference", __package__)
