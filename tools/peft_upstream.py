"""Run PEFT's own tests twice, plain PEFT and served by lowrank_fused, and compare.

    python -m tools.peft_upstream --peft-tests DIR --select dora|qlora --out FILE.json

DIR is a checkout of PEFT's repository (its ``tests/`` folder is what runs; the installed
``peft`` package is what is tested). With ``--peft-git-dir GIT --peft-commit SHA`` a missing DIR
is made first: ``git --git-dir GIT archive SHA tests pyproject.toml | tar -x -C DIR`` (only the
tests), and the commit is written to ``DIR/PEFT_COMMIT``.

Each run is one pytest process in DIR with ``-p tools.peft_served_plugin`` (this repository
on ``PYTHONPATH``): ``LOWRANK_SERVE_PEFT=0`` for plain PEFT, ``=1`` for served, each writing one
JSON line per test. PEFT's ``addopts`` (``--cov``, and pytest-cov is not a dependency) are
cleared with ``-o addopts=``; nothing else of PEFT's configuration or tests changes.

The JSON summary: PEFT commit and package versions, counts (passed / failed / skipped / error)
plain vs served, the regressions (passing plain, failing served: must be none), the tests that
fail both ways (with the reason: the HF hub, unreachable here, or other), served tests that did
and did not call the operator (and for the latter, why: the layers' fallback reasons, or no LoRA
model built), and the tests skipped for want of a GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "tools.peft_served_plugin"

#: selection -> PEFT test files, and the name terms that pick (include) and drop (exclude)
#: tests in them: pytest's ``-k "(a or b) and not (c or d)"`` (case-insensitive substrings of
#: the test's and its class's names), the same rule ``static_count`` applies to files skipped
#: whole at import
SELECTIONS = {
    # every PEFT test whose name says DoRA: the shared custom-model matrix (Linear, Conv,
    # Embedding, MHA, ... with use_dora=True), DoRA caching, initialisation, variants; the
    # transformers-model files hold no DoRA test by name (listed so that a later PEFT adding
    # some is picked up)
    "dora": {
        "files": ["tests/test_custom_models.py", "tests/test_decoder_models.py",
                  "tests/test_encoder_decoder_models.py",
                  "tests/test_feature_extraction_models.py", "tests/test_helpers.py",
                  "tests/test_initialization.py", "tests/test_lora_variants.py",
                  "tests/test_riemannian_lora.py", "tests/test_torch_compile.py"],
        "include": ["dora"],
        "exclude": [],
    },
    # PEFT's bitsandbytes 4-bit LoRA tests (QLoRA, QDoRA, PiSSA/OLoRA/LoftQ over 4-bit): the
    # other methods' 4-bit tests (BOFT, MiSS, SHiRA, VeRA, IA3, RandLoRA, RoAd, AdaLoRA,
    # HiRA, adaption prompt) are dropped
    "qlora": {
        "files": ["tests/test_common_gpu.py", "tests/test_gpu_examples.py",
                  "tests/test_quantization.py", "tests/test_torch_compile.py",
                  "tests/test_tuners_utils.py", "tests/test_arrow.py"],
        "include": ["4bit", "4_bit", "qlora", "nf4", "fp4"],
        "exclude": ["boft", "miss-", "shira", "vera", "ia3", "randlora", "road", "adalora",
                    "adaption_prompt", "hira"],
    },
}


def k_expression(include, exclude) -> str:
    expr = " or ".join(include)
    if exclude:
        expr = f"({expr}) and not ({' or '.join(exclude)})"
    return expr


def name_selected(name: str, include, exclude) -> bool:
    low = name.lower()
    return any(t.lower() in low for t in include) and not any(t.lower() in low for t in exclude)


def static_count(path: Path, include, exclude) -> list[str]:
    """The test functions of a file pytest skips whole at import (``allow_module_level``, e.g.
    PEFT's GPU example file on a CPU machine) that the selection's rule picks, by reading its
    source: ``Class::test_name`` (parametrizations not expanded)."""
    import ast

    tree = ast.parse(path.read_text())
    names = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and child.name.startswith("Test") or (
                    isinstance(child, ast.ClassDef) and any(
                        "TestCase" in ast.unparse(b) for b in child.bases)) or (
                    isinstance(child, ast.ClassDef) and "Tests" in child.name):
                visit(child, prefix + child.name + "::")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    child.name.startswith("test"):
                full = prefix + child.name
                # a parametrization naming a selected term ("4bit" in parameterized.expand)
                # makes the pick too
                params = " ".join(ast.unparse(d) for d in child.decorator_list)
                if name_selected(full, include, exclude) or (
                        "parameterized.expand" in params or "parametrize" in params) and \
                        name_selected(full + " " + params, include, exclude):
                    names.append(full)

    visit(tree, "")
    return names


OUTCOMES = ("passed", "failed", "skipped", "error", "collection_error")
FAILING = ("failed", "error", "collection_error")
GPU_SKIP = re.compile(r"gpu|cuda|accelerator|xpu|non.cpu|multi.?device", re.IGNORECASE)
HUB = re.compile(r"huggingface\.co|offline|LocalEntryNotFound|ConnectionError|MaxRetryError|"
                 r"NameResolution|Temporary failure in name resolution|couldn't connect|"
                 r"cannot find the requested files|We couldn't connect|HFValidationError|"
                 r"not a valid model identifier|RepositoryNotFound|Network is unreachable|"
                 r"is not a local folder", re.IGNORECASE)


# ---------------------------------------------------------------------------------- checkout
def checkout(peft_tests: Path, git_dir: str | None, commit: str | None) -> str:
    """Make sure DIR holds PEFT's tests; returns the PEFT commit (or "unknown")."""
    marker = peft_tests / "PEFT_COMMIT"
    if not (peft_tests / "tests").is_dir():
        if not (git_dir and commit):
            raise SystemExit(f"{peft_tests}/tests is missing: pass --peft-git-dir and "
                             "--peft-commit to extract PEFT's tests there")
        peft_tests.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", git_dir, "archive", commit, "tests",
                                  "pyproject.toml"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(peft_tests)], input=archive, check=True)
        marker.write_text(commit + "\n")
    if commit:
        return commit
    return marker.read_text().strip() if marker.exists() else "unknown"


def versions() -> dict:
    """Installed versions, read from package metadata (nothing is imported)."""
    import importlib.metadata

    out = {"python": sys.version.split()[0]}
    for name in ("peft", "transformers", "torch", "bitsandbytes", "accelerate", "pytest"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------- run
def start_pytest(root: Path, files: list[str], k: str | None, served: bool, jsonl: Path,
                 log: Path, extra: list[str] = ()) -> tuple:
    """Start one pytest process in ``root`` over ``files``; per-test lines go to ``jsonl``."""
    if jsonl.exists():
        jsonl.unlink()
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider",
           "-p", PLUGIN, "-q", "-rfE", *extra]
    if k:
        cmd += ["-k", k]
    cmd += files
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["LOWRANK_SERVE_PEFT"] = "1" if served else "0"
    env["LOWRANK_PEFT_RESULTS"] = str(jsonl)
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast, identically both ways
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT)
    info = {"command": " ".join(cmd), "cwd": str(root), "log": str(log)}
    return proc, handle, info, time.time()


def finish_pytest(started, timeout: float | None = None) -> dict:
    proc, handle, info, start = started
    try:
        info["returncode"] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        info["returncode"] = proc.wait()
        info["timed_out"] = True
    handle.close()
    info["seconds"] = round(time.time() - start, 1)
    return info


def run_pytest(root: Path, files: list[str], k: str | None, served: bool, jsonl: Path,
               log: Path, extra: list[str] = (), timeout: float | None = None) -> dict:
    """One pytest process, waited for."""
    return finish_pytest(start_pytest(root, files, k, served, jsonl, log, extra), timeout)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------- summary
def _by_id(records) -> dict:
    return {r["nodeid"]: r for r in records}


def counts(records) -> dict:
    """Outcomes of the tests; a file pytest skipped whole (at import, so its tests are never
    collected) counts under ``files_skipped_whole``, not as a test."""
    tests = [r for r in records if not r.get("module_skip")]
    c = collections.Counter(r["outcome"] for r in tests)
    return {o: c.get(o, 0) for o in OUTCOMES} | {
        "total": len(tests), "files_skipped_whole": len(records) - len(tests)}


def zero_call_reason(record) -> str:
    """Why a served test never reached the operator."""
    if record.get("enable_calls", 0) == 0:
        return "no PEFT LoRA model built (nothing to serve)"
    fallbacks = record.get("fallbacks") or {}
    if record.get("served_layers", 0) == 0:
        if fallbacks:
            return "no layer servable: " + "; ".join(sorted(fallbacks))
        return "no layer servable"
    if fallbacks:
        return ("some layers served, none reached the operator (no forward through them, or "
                "merged/disabled); the others fell back: " + "; ".join(sorted(fallbacks)))
    return "layers served, no adapter forward ran (merged, disabled, or no forward pass)"


def summarize(plain: list[dict], served: list[dict]) -> dict:
    """Compare the plain and served runs' per-test records."""
    p, s = _by_id(plain), _by_id(served)
    regressions, both_failing, served_only_pass, missing = [], [], [], []
    for nodeid, rec in p.items():
        other = s.get(nodeid)
        if other is None:
            missing.append(nodeid)
            if rec["outcome"] == "passed":
                regressions.append({"nodeid": nodeid, "served": "missing", "detail": ""})
            continue
        if rec["outcome"] == "passed" and other["outcome"] in FAILING:
            regressions.append({"nodeid": nodeid, "served": other["outcome"],
                                "detail": other.get("detail", "")})
        elif rec["outcome"] in FAILING and other["outcome"] in FAILING:
            why = "needs the HF hub (no network here)" if HUB.search(
                rec.get("detail", "") + " " + other.get("detail", "")) else "other"
            both_failing.append({"nodeid": nodeid, "why": why,
                                 "plain": rec.get("detail", ""),
                                 "served": other.get("detail", "")})
        elif rec["outcome"] in FAILING and other["outcome"] == "passed":
            served_only_pass.append(nodeid)

    ran = [r for r in served if r["outcome"] in ("passed", "failed", "error")]
    with_calls = [r for r in ran if r.get("operator_calls", 0) > 0]
    zero = [r for r in ran if r.get("operator_calls", 0) == 0]
    zero_reasons = collections.Counter(zero_call_reason(r) for r in zero)
    fallback_reasons = collections.Counter()
    for r in served:
        for reason in r.get("fallbacks") or {}:
            fallback_reasons[reason] += 1
    skipped_plain = [r for r in plain if r["outcome"] == "skipped" and not r.get("module_skip")]
    gpu_skips = sorted(r["nodeid"] for r in skipped_plain if GPU_SKIP.search(r.get("detail", "")))
    skip_reasons = collections.Counter(r.get("detail", "") for r in skipped_plain)
    return {
        "counts": {"plain": counts(plain), "served": counts(served)},
        "regressions": regressions,
        "n_regressions": len(regressions),
        "failing_both": both_failing,
        "failing_both_by_reason": dict(collections.Counter(f["why"] for f in both_failing)),
        "passing_served_only": served_only_pass,
        "missing_in_served": missing,
        "plain_operator_calls": sum(r.get("operator_calls", 0) for r in plain),
        "served_ran": len(ran),
        "served_with_operator_calls": {
            "total": len(with_calls),
            "by_outcome": dict(collections.Counter(r["outcome"] for r in with_calls)),
            "operator_calls": sum(r["operator_calls"] for r in with_calls)},
        "served_zero_operator_calls": {
            "total": len(zero),
            "by_outcome": dict(collections.Counter(r["outcome"] for r in zero)),
            "why": dict(zero_reasons.most_common())},
        "fallback_reasons_tests": dict(fallback_reasons.most_common()),
        "skipped_for_gpu": {"count": len(gpu_skips), "tests": gpu_skips},
        "skip_reasons_plain": dict(skip_reasons.most_common()),
        "stubbed_imports": sorted({m for r in plain + served for m in r.get("stubbed", [])}),
    }


def write_summary(out: Path, summary: dict) -> None:
    """``out`` holds one summary per selection (``{"selections": {name: summary}}``): a run of
    one selection keeps the others already there."""
    data = {}
    if out.exists():
        try:
            data = json.loads(out.read_text())
        except json.JSONDecodeError:
            data = {}
    data.setdefault("selections", {})[summary["selection"]] = summary
    data["regressions_total"] = sum(v["n_regressions"] for v in data["selections"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------- cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peft-tests", required=True, type=Path,
                        help="a PEFT checkout holding tests/ (made with --peft-git-dir)")
    parser.add_argument("--select", required=True, choices=sorted(SELECTIONS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--peft-git-dir", help="PEFT git directory to extract tests/ from")
    parser.add_argument("--peft-commit", help="the PEFT commit those tests come from")
    parser.add_argument("--commit-note", default="",
                        help="how the commit was chosen (written to the summary)")
    parser.add_argument("--note", default="", help="a note kept with this selection's summary")
    parser.add_argument("--files", nargs="*", help="override the selection's test files")
    parser.add_argument("-k", dest="k", help="override the selection's -k expression")
    parser.add_argument("--work", type=Path, help="folder for logs and per-test JSON lines "
                        "(default: $TMPDIR/peft_upstream)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per pytest run")
    parser.add_argument("--parallel", action="store_true",
                        help="run the plain and the served pytest processes at once")
    parser.add_argument("--reuse", action="store_true",
                        help="summarize existing per-test files, run nothing")
    args = parser.parse_args(argv)

    root = args.peft_tests.resolve()
    if root.name == "tests" and not (root / "tests").is_dir():
        root = root.parent
    commit = checkout(root, args.peft_git_dir, args.peft_commit)
    selection = dict(SELECTIONS[args.select])
    if args.files is not None:
        selection["files"] = args.files
    selection["k"] = k_expression(selection["include"], selection["exclude"])
    if args.k is not None:
        selection["k"] = args.k
    files = [f for f in selection["files"] if (root / f).exists()]
    absent = [f for f in selection["files"] if f not in files]
    work = args.work or Path(tempfile.gettempdir()) / "peft_upstream"
    work.mkdir(parents=True, exist_ok=True)

    runs, started = {}, {}
    previous = {}
    if args.reuse and args.out.exists():
        previous = json.loads(args.out.read_text()).get("selections", {}).get(
            args.select, {}).get("runs", {})
    for mode in ("plain", "served"):
        jsonl, log = work / f"{args.select}-{mode}.jsonl", work / f"{args.select}-{mode}.log"
        if args.reuse:  # the runs' record from the summary already there, if any
            runs[mode] = dict(previous.get(mode, {}), reused=str(jsonl))
        else:
            started[mode] = start_pytest(root, files, selection["k"], mode == "served", jsonl,
                                         log)
            if not args.parallel:
                runs[mode] = finish_pytest(started.pop(mode), args.timeout)
        if mode in runs:
            runs[mode]["jsonl"] = str(jsonl)
    for mode, proc in started.items():  # --parallel: both ran at once
        runs[mode] = finish_pytest(proc, args.timeout)
        runs[mode]["jsonl"] = str(work / f"{args.select}-{mode}.jsonl")
    plain = read_jsonl(Path(runs["plain"]["jsonl"]))
    served = read_jsonl(Path(runs["served"]["jsonl"]))
    module_skips = {}
    for r in plain:
        if r.get("module_skip") and (root / r["nodeid"]).exists():
            tests = static_count(root / r["nodeid"], selection["include"], selection["exclude"])
            module_skips[r["nodeid"]] = {"reason": r.get("detail", ""),
                                         "selected_tests": len(tests), "tests": tests}
    summarized = summarize(plain, served)
    gpu_files = {f: v["selected_tests"] for f, v in module_skips.items()
                 if GPU_SKIP.search(v["reason"])}
    summarized["skipped_for_gpu"]["files_skipped_whole_for_gpu"] = gpu_files
    summarized["skipped_for_gpu"]["count_with_those_files"] = (
        summarized["skipped_for_gpu"]["count"] + sum(gpu_files.values()))
    summary = {"selection": args.select, "peft_commit": commit, "commit_note": args.commit_note,
               "note": args.note,
               "files": files, "files_absent": absent, "k": selection["k"],
               "versions": versions(), "runs": runs, **summarized,
               "files_skipped_whole": module_skips}
    write_summary(args.out, summary)
    c = summary["counts"]
    print(f"{args.select}: plain {c['plain']}  served {c['served']}  "
          f"regressions {summary['n_regressions']}  "
          f"served with calls {summary['served_with_operator_calls']['total']}, "
          f"zero calls {summary['served_zero_operator_calls']['total']}")
    return 1 if summary["n_regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
