"""Write the shipped tuning table from the local tuning caches of GPU runs.

The table is lowrank_fused/tuning/shipped_table.json:

    python -m tools.tuning_table CACHE.json [CACHE.json ...] [--out PATH] [--source TEXT]
    python -m tools.tuning_table --sample-cache DIR   # a dry run's stand-in for a GPU's cache

Each CACHE.json is a file of ``lowrank_fused.tuning.cache_dir()`` (``tuning-<digest>.json``)
copied from a GPU machine after a run that decided its keys (``lowrank_fused.warmup``, a
benchmark, a training step). Files of one GPU (name and capability) are merged, later files
winning a key both hold; each GPU measured replaces its section of the table at --out, whose
other GPUs are kept. The inputs are checked against the schema and a malformed one is refused.
``tools/gpu_session.sh policy NAME`` runs it on the GPU's cache file of the session (a dry run:
on ``--sample-cache``'s, written by the real tuner for a made-up GPU on made-up timings).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lowrank_fused.tuning.environment import gpu_model
from lowrank_fused.tuning.schema import (CACHE_SCHEMA, SchemaError, check_environment,
                                         check_sections, check_table)
from lowrank_fused.tuning.shipped import DEFAULT_PATH, empty_table
from lowrank_fused.tuning.store import read_json, write_atomically

MEASURED_WITH = ("driver", "cuda", "torch", "triton", "package", "source")


def read_cache(path) -> tuple[dict, dict, dict]:
    """(environment, winners, kernels) of one local cache file; SchemaError if anything in it
    is malformed (a table is built from clean measurements only)."""
    data, problem = read_json(Path(path))
    if problem or data is None:
        raise SchemaError(problem or f"{path}: no such file")
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
        raise SchemaError(f"{path}: not a tuning cache file (schema {CACHE_SCHEMA!r} expected)")
    environment = check_environment(data.get("environment"), str(path))
    if environment["gpu"] == "cpu" or not environment["capability"]:
        raise SchemaError(f"{path}: measured on {environment['gpu']!r}, not a GPU")
    problems: list = []
    winners, kernels = check_sections(data, str(path), problems)
    if problems:
        raise SchemaError("; ".join(problems))
    return environment, winners, kernels


def gpu_sections(paths, source) -> list[dict]:
    """One table section per GPU (name, capability) among the cache files ``paths``."""
    sections: dict = {}
    for path in paths:
        environment, winners, kernels = read_cache(path)
        at = (environment["gpu"], environment["capability"])
        section = sections.setdefault(at, {
            "name": environment["gpu"], "model": gpu_model(environment["gpu"]),
            "capability": environment["capability"], "measured_with": {},
            "source": source if source is not None else "", "winners": {}, "kernels": {}})
        section["measured_with"] = {f: environment[f] for f in MEASURED_WITH}
        section["winners"].update(winners)
        section["kernels"].update(kernels)
        if source is None:
            section["source"] = ", ".join(filter(None, [section["source"], str(path)]))
    for section in sections.values():
        section["winners"] = dict(sorted(section["winners"].items()))
        section["kernels"] = dict(sorted(section["kernels"].items()))
    return list(sections.values())


def table_text(gpus: list[dict]) -> str:
    """The table file's text: ABOUT and the GPU sections, sorted by name and capability."""
    gpus = sorted(gpus, key=lambda g: (g["name"], g["capability"]))
    return json.dumps(dict(empty_table(), gpus=gpus), indent=1) + "\n"


def existing_gpus(path: Path) -> list[dict]:
    data, problem = read_json(path)
    if data is None:
        if problem:
            raise SchemaError(problem)
        return []
    gpus, problems = check_table(data, str(path))
    if problems:
        raise SchemaError("; ".join(problems))
    return gpus


SAMPLE_GPU = "dry-run sample GPU (not measured)"


def write_sample_cache(directory) -> Path:
    """A cache file as a GPU run leaves one, for dry runs without a GPU: the tuner decides two
    keys (the reference faster forward, Triton backward) for a made-up GPU on made-up
    timings and writes them as it would. Returns the file's path."""
    from lowrank_fused.tuning import Tuner, TuningKey
    from lowrank_fused.tuning.environment import current

    environment = dataclasses.replace(current(), gpu=SAMPLE_GPU, capability="9.0",
                                      driver="sample", cuda="sample")
    made_up_ms = {"forward": {"triton": 2.0, "reference": 1.0},
                  "backward": {"triton": 1.0, "reference": 2.0}}
    tuner = Tuner(cache_dir=directory, table=DEFAULT_PATH, environment=environment,
                  timer=lambda run: run())
    for op, times in made_up_ms.items():
        key = TuningKey.of(op, "bfloat16", "float32", "lora_fa" if op == "backward" else "lora",
                           8192, 4096, 4096, 16, flags=("needs_dx",) if op == "backward" else ())
        tuner.decide(key, {name: (lambda ms=ms: ms / 1e3) for name, ms in times.items()})
    return tuner.store().path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", nargs="*", help="local tuning cache files of GPU runs")
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--source", default=None,
                        help="what the measurements came from (default: the input paths)")
    parser.add_argument("--sample-cache", metavar="DIR", default=None,
                        help="write a sample cache file into DIR (dry runs), print its path")
    args = parser.parse_args(argv)
    if args.sample_cache:
        print(write_sample_cache(args.sample_cache))
        return 0
    if not args.caches:
        parser.error("give the cache files to build the table from (or --sample-cache DIR)")
    out = Path(args.out)
    try:
        measured = gpu_sections(args.caches, args.source)
        kept = [g for g in existing_gpus(out)
                if (g["name"], g["capability"]) not in
                {(m["name"], m["capability"]) for m in measured}]
    except SchemaError as err:
        print(f"tools.tuning_table: {err}", file=sys.stderr)
        return 2
    write_atomically(out, table_text(kept + measured))
    for section in measured:
        wins = {}
        for entry in section["winners"].values():
            wins[entry["winner"]] = wins.get(entry["winner"], 0) + 1
        print(f"{section['name']} (sm {section['capability']}): {len(section['winners'])} keys "
              f"({', '.join(f'{n} {b}' for b, n in sorted(wins.items())) or 'none'}), "
              f"{len(section['kernels'])} kernel choices")
    print(f"-> {out} ({len(kept) + len(measured)} GPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
