"""Turn a pytest-benchmark JSON file into markdown tables of ratios and a PNG plot.

    python -m benchmarks.report RESULTS.json [--markdown OUT.md] [--plot OUT.png] [--readme README.md]

--readme rewrites the table between the README's "results" markers with the headline cases
(LLaMA-7B shapes, M = 8192, r in {16, 64}) of RESULTS.json.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    return data.get("machine_info", {}), [b["extra_info"] for b in data["benchmarks"]]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def throughput_table(infos: list[dict], keep=lambda i: True) -> str:
    cases = [i for i in infos if "ratio_to_linear" in i and i["impl"] != "linear" and keep(i)]
    impls = sorted({i["impl"] for i in cases})
    cells = defaultdict(dict)
    for i in cases:
        cells[(i["shape"], i["M"], i["rank"], i["method"], i["mode"])][i["impl"]] = i["ratio_to_linear"]
    rows = [[shape, str(m), str(r), method, mode] +
            [f"{cells[key][impl]:.3f}" if impl in cells[key] else "" for impl in impls]
            for key in sorted(cells) for shape, m, r, method, mode in [key]]
    return _table(["shape", "M", "r", "method", "mode"] + [f"{i} / linear" for i in impls], rows)


def memory_table(infos: list[dict]) -> str:
    cases = [i for i in infos if "saved_bytes" in i]
    rows = [[i["shape"], str(i["M"]), str(i["rank"]), i["impl"], i["method"],
             f"{i['saved_bytes'] / 2**20:.2f}", f"{i['saved_bytes'] / i['x_bytes']:.3f}",
             f"{i['peak_extra_bytes'] / 2**20:.1f}" if "peak_extra_bytes" in i else "n/a"]
            for i in sorted(cases, key=lambda i: (i["shape"], i["method"], i["impl"]))]
    return _table(["shape", "M", "r", "impl", "method", "saved MiB", "saved / x",
                   "peak extra MiB"], rows)


def stack_table(infos: list[dict]) -> str:
    cases = [i for i in infos if "largest_batch" in i]
    rows = [[i["contender"], str(i["largest_batch"]), str(i["largest_tokens"]),
             f"{i['layers']} x d={i['d']}, ff={i['ff']}, seq={i['seq']}", i["device"]]
            for i in cases]
    return _table(["contender", "largest batch", "tokens", "stack", "device"], rows)


def headline(i: dict) -> bool:
    """A throughput case at a LLaMA-7B shape, M = 8192, r in {16, 64}; other records (memory,
    stack, overhead) carry no shape and are never headline."""
    return ("ratio_to_linear" in i and str(i.get("shape", "")).startswith("llama")
            and i.get("M") == 8192 and i.get("rank") in (16, 64))


def overhead_table(infos: list[dict]) -> str:
    cases = [i for i in infos if i.get("overhead")]
    rows = [[i["mode"], f"M={i['M']}, K={i['K']}, N={i['N']}, r={i['rank']}", i["backend"],
             f"{i['ours_us']:.1f}", f"{i['unfused_us']:.1f}", f"{i['ratio_to_unfused']:.2f}"]
            for i in cases]
    return _table(["mode", "shape", "backend", "low_rank_linear µs", "unfused µs",
                   "ratio"], rows)


def markdown(machine: dict, infos: list[dict]) -> str:
    device = next((i["device"] for i in infos if "device" in i), "unknown")
    return "\n\n".join([
        f"Device: {device}. Ratios are median times over the bare frozen nn.Linear of the same "
        "shape, measured in the same run (lower is better; 1.0 is the floor).",
        "## Throughput\n\n" + throughput_table(infos),
        "## Saved activations and peak memory per layer\n\n" + memory_table(infos),
        "## LLaMA-style stack, all seven projections adapted, until out of memory\n\n"
        + stack_table(infos),
        "## Python-layer overhead per call (tiny CPU tensors, same run)\n\n"
        + overhead_table(infos),
    ]) + "\n"


def plot(infos: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [i for i in infos if "ratio_to_linear" in i and i["impl"] != "linear"]
    modes = sorted({i["mode"] for i in cases})
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        chosen = [i for i in cases if i["mode"] == mode]
        labels = sorted({f"{i['impl']}\n{i['method']}" for i in chosen})
        values = [[i["ratio_to_linear"] for i in chosen if f"{i['impl']}\n{i['method']}" == lab]
                  for lab in labels]
        ax.boxplot(values)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=45)
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_title(f"{mode}: time / bare frozen nn.Linear (all shapes)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def update_readme(readme: Path, infos: list[dict], source: str) -> None:
    text = readme.read_text()
    table = throughput_table(infos, headline) if any(map(headline, infos)) else throughput_table(infos)
    block = f"{START}\nFrom `{source}`:\n\n{table}\n{END}"
    if START not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                             flags=re.S))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of the ratios here")
    parser.add_argument("--readme", type=Path, help="refresh this README's results table")
    args = parser.parse_args(argv)
    machine, infos = load(args.results)
    text = markdown(machine, infos)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)
    if args.plot:
        plot(infos, args.plot)
    if args.readme:
        update_readme(args.readme, infos, args.results.as_posix())


if __name__ == "__main__":
    main()
