"""The local tuning cache: one JSON file per environment, under Triton's cache directory.

``$LOWRANK_FUSED_CACHE_DIR`` if set, else ``<Triton's cache dir>/lowrank_fused`` (Triton's is
``$TRITON_CACHE_DIR``, default ``~/.triton/cache``). The file is
``tuning-<environment digest>.json`` (``schema.cache_document``).

Writes are atomic and merge: under an exclusive lock on a sidecar ``.lock`` file (fcntl, where
the platform has it) the file is read again, this process's new entries are laid over what is
there (so two processes tuning at once both keep their keys), and the result is written to a
temporary file that replaces the old one (``os.replace``): a reader sees the old file or the
new, never a torn one. Without fcntl, or when the lock is not granted within LOCK_TIMEOUT_S, the
write goes ahead unlocked: still never torn, at worst one process's new keys are tuned again.

Anything unusable in the file (not JSON, truncated, too large, another schema or environment,
a malformed or inconsistent entry) is ignored with one ``TuningCacheWarning`` per file and
process, and replaced at the next write; an unwritable directory is warned about once and the
choices are kept in memory. The cache never raises into a call.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

from .environment import Environment
from .schema import MAX_BYTES, SchemaError, cache_document, check_cache

DIR_ENV = "LOWRANK_FUSED_CACHE_DIR"
LOCK_TIMEOUT_S = 10.0
RETUNE = "ignored: its keys are tuned again and the file rewritten"


class TuningCacheWarning(RuntimeWarning):
    """Part of the tuning cache or the shipped table could not be used (it costs a retune)."""


def triton_cache_dir() -> str:
    """Triton's own cache directory (``TRITON_CACHE_DIR``, else under ``TRITON_HOME`` or ~)."""
    try:
        from triton import knobs  # Triton >= 3.3
        return knobs.cache.dir
    except Exception:  # an older Triton, or none: its documented default
        pass
    try:
        from triton.runtime.cache import default_cache_dir
        return default_cache_dir()
    except Exception:
        home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache")


def cache_dir() -> Path:
    """Where the local tuning cache lives (see the module's docstring)."""
    explicit = os.environ.get(DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(triton_cache_dir()) / "lowrank_fused"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive fcntl lock on ``lock_path`` (created if needed) for the block; no lock
    where fcntl is missing or the lock is not granted within LOCK_TIMEOUT_S."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace alone
        yield
        return
    with open(lock_path, "a+b") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        locked = False
        while not locked:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_json(path: Path):
    """(parsed JSON or None, problem or None); None, None for a missing file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (yet)
        return None, None
    except OSError as err:
        return None, f"cannot read {path}: {err}"
    if len(raw) > MAX_BYTES:
        return None, f"{path} is larger than {MAX_BYTES} bytes"
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, f"{path} is not valid JSON ({type(err).__name__}: {err})"


class Store:
    """The cache file of one environment: lookups from memory (read once, lazily), writes
    merged into the file as they happen."""

    def __init__(self, directory: Path, environment: Environment):
        self.directory = Path(directory)
        self.environment = environment
        self.path = self.directory / f"tuning-{environment.digest}.json"
        self._lock = threading.Lock()
        self._loaded = False
        self._winners: dict = {}
        self._kernels: dict = {}
        self._mine: tuple = ({}, {})  # what this process decided: laid over the file on write
        self._warned = False

    def warn(self, problem: str, consequence: str = RETUNE) -> None:
        """One TuningCacheWarning per store: later problems are already covered by it."""
        if self._warned:
            return
        self._warned = True
        warnings.warn(f"lowrank_fused: tuning cache {self.path}: {problem}; {consequence}",
                      TuningCacheWarning, stacklevel=4)

    def _read(self) -> tuple[dict, dict]:
        data, problem = read_json(self.path)
        if data is None:
            if problem:
                self.warn(problem)
            return {}, {}
        try:
            winners, kernels, problems = check_cache(data, self.environment.as_dict(),
                                                     str(self.path))
        except SchemaError as err:
            self.warn(str(err))
            return {}, {}
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self.warn(f"{len(problems)} malformed entries: {problems[0]}{more}")
        return winners, kernels

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._winners, self._kernels = self._read()
            self._loaded = True

    def winner(self, key_id: str) -> Optional[dict]:
        """The checked winner entry of ``key_id``, or None."""
        with self._lock:
            self._ensure_loaded()
            return self._winners.get(key_id)

    def kernel(self, entry_id: str) -> Optional[dict]:
        """The checked kernel-choice entry of ``entry_id``, or None."""
        with self._lock:
            self._ensure_loaded()
            return self._kernels.get(entry_id)

    def forget_winner(self, key_id: str) -> None:
        """Drop an entry found unusable for this process (it is rewritten once retuned)."""
        with self._lock:
            self._winners.pop(key_id, None)

    def forget_kernel(self, entry_id: str) -> None:
        with self._lock:
            self._kernels.pop(entry_id, None)

    def put(self, winners: Optional[dict] = None, kernels: Optional[dict] = None) -> None:
        """Record new entries (already in the schema's form) and merge them into the file."""
        with self._lock:
            self._ensure_loaded()
            self._mine[0].update(winners or {})
            self._mine[1].update(kernels or {})
            self._winners.update(winners or {})
            self._kernels.update(kernels or {})
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with _exclusive(self.path.with_name(self.path.name + ".lock")):
                    on_disk = self._read()
                    merged = [{**found, **mine} for found, mine in zip(on_disk, self._mine)]
                    write_atomically(self.path, json.dumps(
                        cache_document(self.environment.as_dict(), *merged), indent=1) + "\n")
            except OSError as err:
                self.warn(f"cannot write it ({err})", "choices are kept for this process only")
                return
            self._winners, self._kernels = merged
