"""The JSON the tuning cache and the shipped table hold, and its check on read.

Both files hold data only: a backend winner per ``TuningKey`` ("winners") and kernel-level
choices ("kernels": an autotuner's launch config, a GEMM variant) per entry id. Reading checks
every field; a malformed entry is dropped (and reported), never executed or trusted: a config
or backend is only ever *matched against* the candidates of the call, so a crafted name can
at worst miss and cost a retune.
"""
from __future__ import annotations

import math

from .environment import FIELDS
from .key import TuningKey

CACHE_SCHEMA = "lowrank_fused.tuning-cache/1"
TABLE_SCHEMA = "lowrank_fused.tuning-table/1"
BACKENDS = ("triton", "cuda", "reference")
MAX_BYTES = 16 * 2**20  # a larger file is not ours: refused unread
_MAX_DEPTH = 6  # a kernel choice is a config dict at most two levels deep


class SchemaError(ValueError):
    """A file or entry that does not match the schema."""


def _is_time(value) -> bool:
    return value is None or (type(value) in (int, float) and math.isfinite(value) and value >= 0)


def check_winner(key_id, entry) -> dict:
    """A backend winner entry: {"winner": name, "times_ms": {name: ms or null (failed)}}, the
    winner timed and fastest. Returns it; SchemaError otherwise."""
    if not isinstance(key_id, str):
        raise SchemaError(f"key {key_id!r} is not a string")
    TuningKey.parse(key_id)  # ValueError naming what is malformed
    if not isinstance(entry, dict) or set(entry) != {"winner", "times_ms"}:
        raise SchemaError(f"{key_id}: expected {{'winner', 'times_ms'}}, got {_shape(entry)}")
    winner, times = entry["winner"], entry["times_ms"]
    if winner not in BACKENDS:
        raise SchemaError(f"{key_id}: winner {winner!r} is not a backend ({', '.join(BACKENDS)})")
    if (not isinstance(times, dict) or not set(times) <= set(BACKENDS)
            or not all(_is_time(t) for t in times.values())):
        raise SchemaError(f"{key_id}: times_ms must map backends to milliseconds (or null)")
    timed = {name: t for name, t in times.items() if t is not None}
    if winner not in timed or timed[winner] > min(timed.values()):
        raise SchemaError(f"{key_id}: winner {winner!r} is not the fastest timed contender")
    return {"winner": winner, "times_ms": dict(times)}


def _plain(value, depth=0) -> bool:
    """JSON scalars, lists and string-keyed objects, nested at most _MAX_DEPTH deep."""
    if depth > _MAX_DEPTH:
        return False
    if value is None or type(value) in (str, int, bool):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def check_kernel(entry_id, entry) -> dict:
    """A kernel-level choice: {"choice": value, "times_ms": [ms or null, ...] (the candidates'
    times in their order, or empty)}. The value is only compared with the caller's candidates."""
    if not isinstance(entry_id, str) or not entry_id:
        raise SchemaError(f"kernel entry id {entry_id!r} is not a non-empty string")
    if not isinstance(entry, dict) or set(entry) != {"choice", "times_ms"}:
        raise SchemaError(f"{entry_id}: expected {{'choice', 'times_ms'}}, got {_shape(entry)}")
    if not _plain(entry["choice"]):
        raise SchemaError(f"{entry_id}: the choice is not plain JSON data")
    times = entry["times_ms"]
    if not isinstance(times, list) or not all(_is_time(t) for t in times):
        raise SchemaError(f"{entry_id}: times_ms must be a list of milliseconds (or null)")
    return {"choice": entry["choice"], "times_ms": list(times)}


def _shape(value) -> str:
    return f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__


def check_sections(data: dict, where: str, problems: list) -> tuple[dict, dict]:
    """(winners, kernels) of a file section, each entry checked; a bad entry is dropped and
    its reason appended to ``problems``."""
    sections = []
    for name, check in (("winners", check_winner), ("kernels", check_kernel)):
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            problems.append(f"{where}: '{name}' is not an object")
            raw = {}
        kept = {}
        for entry_id, entry in raw.items():
            try:
                kept[entry_id] = check(entry_id, entry)
            except ValueError as err:  # SchemaError, or a malformed key id
                problems.append(f"{where}: {err}")
        sections.append(kept)
    return sections[0], sections[1]


def check_environment(value, where: str) -> dict:
    if (not isinstance(value, dict) or set(value) != set(FIELDS)
            or not all(isinstance(v, str) for v in value.values())):
        raise SchemaError(f"{where}: 'environment' must map {', '.join(FIELDS)} to strings")
    return dict(value)


def cache_document(environment: dict, winners: dict, kernels: dict) -> dict:
    """The local cache file's content."""
    return {"schema": CACHE_SCHEMA, "environment": environment,
            "winners": dict(sorted(winners.items())), "kernels": dict(sorted(kernels.items()))}


def check_cache(data, environment: dict, where: str) -> tuple[dict, dict, list]:
    """(winners, kernels, problems) of a local cache file's parsed JSON for ``environment``
    (a dict). A file of another schema or environment holds nothing usable: SchemaError."""
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise SchemaError(f"{where}: schema {found!r}, expected {CACHE_SCHEMA!r}")
    if check_environment(data.get("environment"), where) != environment:
        raise SchemaError(f"{where}: measured in another environment "
                          f"({_difference(data['environment'], environment)})")
    problems: list = []
    winners, kernels = check_sections(data, where, problems)
    return winners, kernels, problems


def _difference(found: dict, expected: dict) -> str:
    return ", ".join(f"{k} {found[k]!r} instead of {expected[k]!r}"
                     for k in FIELDS if found.get(k) != expected[k])


_GPU_FIELDS = {"name", "model", "capability", "measured_with", "source", "winners", "kernels"}


def check_table(data, where: str) -> tuple[list, list]:
    """(gpus, problems) of a shipped table's parsed JSON: each GPU section
    {name, model, capability, measured_with, source, winners, kernels} checked, bad entries
    dropped. SchemaError for a file that is not a table at all."""
    if not isinstance(data, dict) or data.get("schema") != TABLE_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise SchemaError(f"{where}: schema {found!r}, expected {TABLE_SCHEMA!r}")
    if not isinstance(data.get("gpus"), list):
        raise SchemaError(f"{where}: 'gpus' must be a list")
    problems: list = []
    gpus = []
    for i, gpu in enumerate(data["gpus"]):
        at = f"{where}: gpus[{i}]"
        if (not isinstance(gpu, dict) or set(gpu) != _GPU_FIELDS
                or not all(isinstance(gpu[f], str) for f in ("name", "model", "capability"))
                or not isinstance(gpu["measured_with"], dict)
                or not all(isinstance(v, str) for v in gpu["measured_with"].values())
                or not (gpu["source"] is None or isinstance(gpu["source"], str))):
            problems.append(f"{at}: expected string name, model, capability, a measured_with "
                            f"object of strings, source, winners, kernels")
            continue
        winners, kernels = check_sections(gpu, f"{at} ({gpu['name']})", problems)
        gpus.append(dict(gpu, winners=winners, kernels=kernels))
    return gpus, problems
