"""The timed choice: for one ``TuningKey``, the fastest of the contenders ("triton", "cuda",
"reference"), decided once and remembered.

``Tuner.decide(key, contenders)`` returns, in this order:

1. what this process already decided for the key;
2. the local cache's winner (``store``), if it is one of the contenders;
3. the shipped table's (``shipped``), likewise;
4. under torch.compile tracing, or when the caller says timing is off (``untimed=``, e.g. for
   ``LOWRANK_FUSED_AUTOTUNE=quick``): ``default``, untimed and not remembered (a later eager
   call may still time the key);
5. otherwise each contender once (compile, autotune and first-use checks happen there, outside
   the timing), then timed by the ``Timer``; the fastest wins (ties: the one listed first), is
   written to the local cache and reported. Under CUDA graph capture step 5 raises
   ``CaptureError`` instead. A contender that raises is left out with a warning.

Every decision is a row of ``report()`` (``lowrank_fused.tuning_report()``).
``kernel_choice`` is the same lookup for kernel-level choices (an autotuner's config, a GEMM
variant), whose measuring the caller supplies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from . import environment as environment_module
from .environment import Environment
from .guard import capture_error, check_not_capturing, tracing
from .key import TuningKey
from .schema import BACKENDS
from .shipped import ShippedTable, table as shipped_table
from .store import Store, cache_dir
from .timing import Timer, default_timer

TIMED, LOCAL, SHIPPED, ONLY, UNTIMED = (
    "timed now", "local cache", "shipped table", "only contender", "default (untimed)")
SOURCES = (TIMED, LOCAL, SHIPPED, ONLY, UNTIMED)


@dataclasses.dataclass(frozen=True)
class Decision:
    """One row of the tuning report."""
    key: TuningKey
    device: str
    contenders: tuple
    times_ms: dict
    winner: str
    source: str
    note: str = ""

    def as_row(self) -> dict:
        return {"key": self.key.id, "description": self.key.describe(), "device": self.device,
                "contenders": list(self.contenders), "times_ms": dict(self.times_ms),
                "winner": self.winner, "source": self.source, "note": self.note}


def kernel_entry_id(kind: str, name: str, tuning_key, candidates: Sequence) -> str:
    """The cache id of a kernel-level choice: its kind ("autotune", "variant"), the kernel or
    launcher name, the caller's tuning key, and a digest of the candidates (a changed config
    list is a new entry, so a stale choice is never applied to it)."""
    digest = hashlib.sha256(json.dumps(list(candidates), sort_keys=True).encode()).hexdigest()
    return f"{kind}|{name}|{tuning_key}|{digest[:12]}"


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 6)


EnvironmentSource = Union[Environment, Callable[[Optional[torch.device]], Environment], None]


class Tuner:
    """Decisions of one process. Arguments (all optional, for tests and tools):
    ``cache_dir``: the local cache's directory (default ``store.cache_dir()``, read when first
    needed); ``table``: the shipped table (a path or a ShippedTable; default
    ``shipped.table()``); ``timer``: a Timer (default ``timing.default_timer(device)``);
    ``environment``: an Environment, or a function of the device returning one (default
    ``environment.current``)."""

    def __init__(self, *, cache_dir: Optional[Union[str, Path]] = None,
                 table: Optional[Union[str, Path, ShippedTable]] = None,
                 timer: Optional[Timer] = None, environment: EnvironmentSource = None):
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._table = table
        self._timer = timer
        self._environment = environment
        self._lock = threading.RLock()
        self._stores: dict = {}
        self._memo: dict = {}  # (environment digest, key) -> winner
        self._rows: dict = {}  # (environment digest, key) -> Decision
        self._kernel_memo: dict = {}
        self._listeners: list = []

    # -- where things are ----------------------------------------------------------------------
    def environment(self, device=None) -> Environment:
        source = self._environment
        if isinstance(source, Environment):
            return source
        return (source or environment_module.current)(device)

    def store(self, device=None) -> Store:
        env = self.environment(device)
        with self._lock:
            if env.digest not in self._stores:
                self._stores[env.digest] = Store(self._cache_dir or cache_dir(), env)
            return self._stores[env.digest]

    def table(self) -> ShippedTable:
        if isinstance(self._table, ShippedTable):
            return self._table
        return shipped_table(self._table)

    def add_listener(self, listener: Callable[[Decision], None]) -> Callable[[], None]:
        """Call ``listener(decision)`` on every new decision; returns the function removing it."""
        with self._lock:
            self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- backend choice ------------------------------------------------------------------------
    def decide(self, key: TuningKey, contenders: Mapping[str, Callable[[], object]], *,
               device=None, default: Optional[str] = None, untimed: Optional[str] = None) -> str:
        """The backend to run ``key`` with (see the module's docstring). ``contenders``: backend
        name -> a zero-argument function running that backend on the call's tensors (its result
        is discarded); ``default``: the contender for untimed calls (default: the first);
        ``untimed``: a reason not to time (then default, unless one is recorded)."""
        names = tuple(contenders)
        if not names or not set(names) <= set(BACKENDS):
            raise ValueError(f"contenders must be a non-empty subset of {BACKENDS}, got {names}")
        default = default or names[0]
        if default not in names:
            raise ValueError(f"default {default!r} is not one of the contenders {names}")
        env = self.environment(device)
        memo_key = (env.digest, key)
        winner = self._memo.get(memo_key)
        if winner is not None and winner in names:
            return winner
        with self._lock:
            return self._decide(key, contenders, names, env, device, default, untimed)

    def decided(self, key: TuningKey, device=None) -> Optional[str]:
        """The winner this process already settled for ``key``, else None: the cheap check a
        caller makes before building contenders."""
        return self._memo.get((self.environment(device).digest, key))

    def _decide(self, key, contenders, names, env, device, default, untimed) -> str:
        memo_key = (env.digest, key)
        if untimed is None and tracing():
            untimed = "torch.compile is tracing"
        previous = self._rows.get(memo_key)
        if (previous is not None and previous.source == UNTIMED and untimed is not None
                and (previous.note, previous.winner) == (untimed, default)):
            return default  # reported once already
        if len(names) == 1:
            return self._settle(memo_key, Decision(key, env.gpu, names, {}, names[0], ONLY))
        recorded = self._recorded(key, names, env, device)
        if recorded is not None:
            return self._settle(memo_key, recorded)
        if untimed is not None:
            decision = Decision(key, env.gpu, names, {}, default, UNTIMED, untimed)
            self._rows[memo_key] = decision  # reported, not remembered: an eager call may time
            self._notify(decision)
            return default
        check_not_capturing(f"the backend of {key.describe()}")
        times = self._time(key, contenders, device)
        timed = {name: t for name, t in times.items() if t is not None}
        winner = min(timed, key=timed.get)  # dicts keep the contenders' order: ties go first
        times_ms = {name: _ms(t) for name, t in times.items()}
        self.store(device).put(winners={key.id: {"winner": winner, "times_ms": times_ms}})
        return self._settle(memo_key, Decision(key, env.gpu, names, times_ms, winner, TIMED))

    def _recorded(self, key, names, env, device) -> Optional[Decision]:
        """The local cache's decision, else the shipped table's, if it names a contender."""
        store = self.store(device)
        entry = store.winner(key.id)
        if entry is not None:
            if entry["winner"] in names:
                return Decision(key, env.gpu, names, entry["times_ms"], entry["winner"], LOCAL)
            store.warn(f"entry {key.id} names {entry['winner']!r}, not one of this call's "
                       f"contenders {names}")
            store.forget_winner(key.id)
        entry = self.table().winner(env, key.id)
        if entry is not None and entry["winner"] in names:
            return Decision(key, env.gpu, names, entry["times_ms"], entry["winner"], SHIPPED)
        return None

    def _time(self, key, contenders, device) -> dict:
        timer = self._timer or default_timer(device if device is not None else "cpu")
        times, errors = {}, {}
        for name, run in contenders.items():
            try:
                run()  # compiles, autotunes, checks first use: outside the timing
                times[name] = float(timer(run))
            except Exception as error:  # a contender that fails leaves the others
                if isinstance(error, capture_error()):
                    raise
                times[name], errors[name] = None, error
        if len(errors) == len(contenders):
            raise next(iter(errors.values()))
        for name, error in errors.items():
            warnings.warn(f"lowrank_fused: backend {name!r} failed while timing "
                          f"{key.describe()} ({error!r}); the other contenders compete",
                          RuntimeWarning, stacklevel=4)
        return times

    def _settle(self, memo_key, decision: Decision) -> str:
        self._memo[memo_key] = decision.winner
        self._rows[memo_key] = decision
        self._notify(decision)
        return decision.winner

    def _notify(self, decision: Decision) -> None:
        for listener in list(self._listeners):
            listener(decision)

    # -- kernel-level choices ------------------------------------------------------------------
    def kernel_choice(self, entry_id: str, candidates: Sequence,
                      measure: Callable[[], tuple], *, device=None,
                      what: str = "a kernel's launch config") -> int:
        """The index in ``candidates`` (JSON values: a config as a dict, a variant name) of the
        remembered choice for ``entry_id`` (``kernel_entry_id``): this process's, the local
        cache's, the shipped table's; else ``measure()`` -> (index, [ms or None per
        candidate]) is called (not under CUDA graph capture: CaptureError) and recorded. A
        recorded choice that is not among the candidates is ignored with a warning."""
        candidates = list(candidates)
        env = self.environment(device)
        memo_key = (env.digest, entry_id)
        with self._lock:
            if memo_key in self._kernel_memo:
                return self._kernel_memo[memo_key]
            store = self.store(device)
            for entry, forget in ((store.kernel(entry_id), store.forget_kernel),
                                  (self.table().kernel(env, entry_id), None)):
                if entry is None:
                    continue
                if entry["choice"] in candidates:
                    index = candidates.index(entry["choice"])
                    self._kernel_memo[memo_key] = index
                    return index
                if forget is not None:
                    store.warn(f"entry {entry_id} names a choice that is not a candidate: "
                               f"{json.dumps(entry['choice'])[:200]}")
                    forget(entry_id)
            check_not_capturing(what)
            index, times_ms = measure()
            if not (isinstance(index, int) and 0 <= index < len(candidates)):
                raise ValueError(f"measure() returned index {index!r} for {len(candidates)} "
                                 f"candidates")
            store.put(kernels={entry_id: {"choice": candidates[index],
                                          "times_ms": [None if t is None else round(float(t), 6)
                                                       for t in times_ms]}})
            self._kernel_memo[memo_key] = index
            return index

    # -- the report ----------------------------------------------------------------------------
    def report(self) -> list:
        """One row (a dict) per key decided in this process, in the order first decided."""
        with self._lock:
            return [decision.as_row() for decision in self._rows.values()]

    def forget(self) -> None:
        """Forget this process's decisions (the cache files stay)."""
        with self._lock:
            self._memo.clear()
            self._rows.clear()
            self._kernel_memo.clear()
            self._stores.clear()
