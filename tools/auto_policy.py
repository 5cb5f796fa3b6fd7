"""Write the measured per-shape backend policy (lowrank_fused/auto_policy.json) from a GPU run of
the throughput suite:

    python -m tools.auto_policy RESULTS.json [--out lowrank_fused/auto_policy.json]

Every case timed for both the "triton" and the "cuda" backend becomes one entry naming the faster,
with both median times, so the file says what each choice rests on.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.report import load
from lowrank_fused.policy import BACKENDS

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lowrank_fused" / "auto_policy.json"
# The one text of the file's "about" (the packaged file's is checked against it in the tests).
ABOUT = ("Measured per-shape choice of 'auto' between the triton and cuda backends on CUDA "
         "tensors. Written by: python -m tools.auto_policy RESULTS.json. With no entry for "
         "a call's GPU architecture, dtype and mode, 'auto' uses triton.")


def entries_from(infos: list[dict]) -> list[dict]:
    timed = {}
    for i in infos:
        if i.get("impl") not in BACKENDS or "arch" not in i:
            continue
        key = (i["arch"], i["dtype"].replace("torch.", ""), i["method"], i["mode"], i["M"],
               i["N"], i["K"], i["rank"])
        timed.setdefault(key, {})[i["impl"]] = i["median_ms"]
    entries = []
    for key, times in sorted(timed.items()):
        if len(times) < 2:
            continue
        arch, dtype, method, mode, m, n, k, r = key
        entries.append(dict(arch=arch, dtype=dtype, method=method, mode=mode, m=m,
                            n=n, k=k, r=r, winner=min(times, key=times.get),
                            median_ms={b: round(t, 5) for b, t in sorted(times.items())}))
    return entries


def policy_text(entries: list[dict], source, devices: list[str]) -> str:
    """The policy file's text: entries, the results file they came from and its devices."""
    return json.dumps({"about": ABOUT, "source": source, "devices": devices, "entries": entries},
                      indent=1) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    _, infos = load(args.results)
    entries = entries_from(infos)
    devices = sorted({i["device"] for i in infos if i.get("impl") in BACKENDS and "device" in i})
    Path(args.out).write_text(policy_text(entries, str(args.results), devices))
    wins = {b: sum(e["winner"] == b for e in entries) for b in BACKENDS}
    print(f"{len(entries)} measured cases ({wins['triton']} triton, {wins['cuda']} cuda) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
