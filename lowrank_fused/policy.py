"""The measured per-shape choice between the "triton" and "cuda" backends that "auto" makes on
CUDA tensors.

The policy is a JSON file of measured cases, written by ``python -m tools.auto_policy`` from
a GPU run of the throughput suite (the file's "source" names that run's results file; no GPU run
is measured yet, so the packaged file has no entries). Each entry says which backend was faster
for one GPU architecture, dtype, method, mode and shape (M, N, K, r). A call takes the winner of the nearest measured shape
(distance in log2 of each dimension) among the entries of its arch, dtype and mode,
preferring its own method. With no such entry there is no measured choice and ``choose``
returns None; the caller then keeps its default.

The packaged file is ``lowrank_fused/auto_policy.json``; the environment variable
``LOWRANK_FUSED_POLICY`` points at another one (your own measurements).
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Optional

ENV_VAR = "LOWRANK_FUSED_POLICY"
DEFAULT_PATH = Path(__file__).with_name("auto_policy.json")
BACKENDS = ("triton", "cuda")
MODES = ("forward", "forward+backward")
_ENTRY_KEYS = {"arch": str, "dtype": str, "method": str, "mode": str, "m": int, "n": int,
               "k": int, "r": int, "winner": str}


def policy_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def _check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be an object, got {type(entry).__name__}")
    for key, kind in _ENTRY_KEYS.items():
        if not isinstance(entry.get(key), kind):
            raise ValueError(f"{where}: entry {entry} needs '{key}' of type {kind.__name__}")
    if entry["winner"] not in BACKENDS:
        raise ValueError(f"{where}: winner must be one of {BACKENDS}, got {entry['winner']!r}")
    if entry["mode"] not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {entry['mode']!r}")
    if min(entry["m"], entry["n"], entry["k"], entry["r"]) < 1:
        raise ValueError(f"{where}: entry {entry} has a dimension < 1")
    return entry


@functools.lru_cache(maxsize=8)
def _load(path: str) -> tuple:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"backend policy {path} ({ENV_VAR}) must be JSON text in UTF-8, got "
                         f"bytes that are not UTF-8 ({err})") from err
    except OSError as err:
        raise ValueError(f"cannot read the backend policy {path} ({ENV_VAR}): {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot read the backend policy {path} ({ENV_VAR}): {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"backend policy {path}: expected an object with an 'entries' list")
    return tuple(_check_entry(e, f"backend policy {path}") for e in data["entries"])


def entries() -> tuple:
    """The measured entries of the policy in force (cached per file)."""
    return _load(str(policy_path()))


def _distance(entry: dict, m: Optional[int], n: int, k: int, r: int) -> float:
    dims = [(entry["n"], n), (entry["k"], k), (entry["r"], r)]
    if m is not None:  # unknown under dynamic shapes: then M does not count
        dims.append((entry["m"], max(m, 1)))
    return sum(abs(math.log2(a) - math.log2(b)) for a, b in dims)


def choose(arch: str, dtype: str, method: str, mode: str, m: Optional[int], n: int, k: int,
           r: int) -> Optional[str]:
    """The measured winner ("triton" or "cuda") nearest to this call, or None if the policy has
    no entry for this GPU architecture (e.g. "sm90"), dtype (e.g. "bfloat16") and mode."""
    pool = [e for e in entries()
            if e["arch"] == arch and e["dtype"] == dtype and e["mode"] == mode]
    same_method = [e for e in pool if e["method"] == method]
    pool = same_method or pool
    if not pool:
        return None
    best = min(pool, key=lambda e: _distance(e, m, n, k, r))
    return best["winner"]
