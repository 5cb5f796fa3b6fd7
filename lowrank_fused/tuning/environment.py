"""What a tuning result is valid for: the GPU, its driver and the software that ran the timing.

Results measured under one environment say little about another (a new driver, torch or Triton
changes the kernels' speed; a new version of this package, or an edited kernel source, changes
the kernels themselves), so the local cache keeps one file per environment (``digest``) and the
shipped table matches by GPU (``gpu_model``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Optional

import torch

FIELDS = ("gpu", "capability", "driver", "cuda", "torch", "triton", "package", "source")


@dataclasses.dataclass(frozen=True)
class Environment:
    """gpu: the device name ("NVIDIA H100 80GB HBM3", or "cpu"); capability: "9.0" ("" off a
    GPU); driver: the NVIDIA driver's version; cuda: torch's CUDA runtime; torch, triton, package:
    versions; source: a digest of the kernel and backend sources (an edited kernel is a new
    environment, so a development checkout never reuses a stale choice)."""
    gpu: str
    capability: str
    driver: str
    cuda: str
    torch: str
    triton: str
    package: str
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @functools.cached_property  # read on every decision: computed once
    def digest(self) -> str:
        """16 hex digits naming this environment (the cache file's name)."""
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def model(self) -> str:
        return gpu_model(self.gpu)


def gpu_model(name: str) -> str:
    """The GPU model in a device name: "H100" for "NVIDIA H100 80GB HBM3", "A100" for
    "NVIDIA A100-SXM4-80GB"; the name itself when no model number is found."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return match.group(1) if match else name


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    """The NVIDIA kernel driver's version from /proc (Linux), else "unknown"."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(errors="replace")
    except OSError:
        return "unknown"
    match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)", text)
    return match.group(1) if match else "unknown"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "none"
    import triton
    return getattr(triton, "__version__", "unknown")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """A digest of the Python sources that launch and define the kernels (triton_kernels/ and
    lowrank_fused/backends/) and of the CUDA extension's file, if built."""
    package = Path(__file__).resolve().parents[1]
    roots = [package / "backends"]
    spec = importlib.util.find_spec("lowrank_fused.triton_kernels")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]))
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    for built in sorted(package.glob("_C*.so")):
        stat = built.stat()
        digest.update(f"{built.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _package_version() -> str:
    from .. import __version__  # the package is imported by then: no cycle
    return __version__


def current(device: Optional[torch.device] = None) -> Environment:
    """The environment of ``device`` (a CUDA device, or anything else for "cpu")."""
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_environment(index)
    return _cpu_environment()


@functools.lru_cache(maxsize=None)
def _cpu_environment() -> Environment:
    return Environment("cpu", "", "none", "none", torch.__version__, _triton_version(),
                       _package_version(), source_digest())


@functools.lru_cache(maxsize=None)
def _cuda_environment(index: int) -> Environment:
    major, minor = torch.cuda.get_device_capability(index)
    return Environment(torch.cuda.get_device_name(index), f"{major}.{minor}", _driver_version(),
                       str(torch.version.cuda), torch.__version__, _triton_version(),
                       _package_version(), source_digest())
