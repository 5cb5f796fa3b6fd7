"""The shipped tuning table: measured winners and kernel choices per GPU model, packaged with
the library and consulted when the local cache has no entry for a key.

``lowrank_fused/tuning/shipped_table.json``, written by ``python -m tools.tuning_table`` from the
local cache files of GPU runs; ``LOWRANK_FUSED_TUNING_TABLE`` points at another table. A GPU
section applies to a device of the same name, else to one of the same model and capability
(an "NVIDIA H100 80GB HBM3" section serves an "NVIDIA H100 PCIe" only if no section names the
PCIe part). Its entries match keys exactly; a key it lacks is timed on the machine.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

from .environment import Environment
from .schema import TABLE_SCHEMA, SchemaError, check_table
from .store import TuningCacheWarning, read_json

TABLE_ENV = "LOWRANK_FUSED_TUNING_TABLE"
# The measured triton-vs-cuda policy file this table replaced; its format is not a table's, so
# the variable is not read: setting it warns once.
REMOVED_ENV = "LOWRANK_FUSED_POLICY"
DEFAULT_PATH = Path(__file__).with_name("shipped_table.json")
# The one text of the file's "about" (the packaged file is checked against the builder's).
ABOUT = ("Measured choices of 'auto' per GPU model: for each key (pass, dtypes, method, flags, "
         "M bucket, N, K, r) the fastest of the fused backends and the reference (cuBLAS) "
         "composition, and the kernels' launch configs. Written by: python -m tools.tuning_table "
         "CACHE.json... from the local tuning caches of GPU runs. A key or GPU not listed is "
         "timed on the machine.")


_warned_removed = False


def table_path() -> Path:
    """``LOWRANK_FUSED_TUNING_TABLE``, else the packaged table."""
    global _warned_removed
    if os.environ.get(REMOVED_ENV) and not _warned_removed:
        _warned_removed = True
        warnings.warn(f"lowrank_fused: {REMOVED_ENV} is no longer read: the measured "
                      f"triton-vs-cuda policy became the shipped tuning table, which times the "
                      f"reference too; point {TABLE_ENV} at a table written by python -m "
                      f"tools.tuning_table instead", TuningCacheWarning, stacklevel=3)
    return Path(os.environ.get(TABLE_ENV) or DEFAULT_PATH)


def empty_table() -> dict:
    return {"schema": TABLE_SCHEMA, "about": ABOUT, "gpus": []}


class ShippedTable:
    """One table file, read once (lazily); problems warned about once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._gpus: Optional[list] = None

    def _load(self) -> list:
        with self._lock:
            if self._gpus is None:
                self._gpus = self._read()
            return self._gpus

    def _read(self) -> list:
        data, problem = read_json(self.path)
        if data is None:
            if problem:
                self._warn(problem)
            return []
        try:
            gpus, problems = check_table(data, str(self.path))
        except SchemaError as err:
            self._warn(str(err))
            return []
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self._warn(f"{len(problems)} malformed entries: {problems[0]}{more}")
        return gpus

    def _warn(self, problem: str) -> None:
        warnings.warn(f"lowrank_fused: shipped tuning table {self.path} ({TABLE_ENV}): "
                      f"{problem}; ignored (keys it would have decided are timed on this "
                      f"machine)",
                      TuningCacheWarning, stacklevel=5)

    def section(self, environment: Environment) -> Optional[dict]:
        """The GPU section for ``environment``'s device, or None."""
        gpus = self._load()
        for gpu in gpus:
            if gpu["name"] == environment.gpu and gpu["capability"] == environment.capability:
                return gpu
        for gpu in gpus:
            if gpu["model"] == environment.model and gpu["capability"] == environment.capability:
                return gpu
        return None

    def winner(self, environment: Environment, key_id: str) -> Optional[dict]:
        section = self.section(environment)
        return section["winners"].get(key_id) if section else None

    def kernel(self, environment: Environment, entry_id: str) -> Optional[dict]:
        section = self.section(environment)
        return section["kernels"].get(entry_id) if section else None


def table(path=None) -> ShippedTable:
    """The table at ``path`` (default: ``table_path()``, read when called), one object per path."""
    return _table(str(path or table_path()))


@functools.lru_cache(maxsize=8)
def _table(path: str) -> ShippedTable:
    return ShippedTable(Path(path))
