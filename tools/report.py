"""Turn a results file into markdown tables of ratios and a PNG plot.

    python -m tools.report NAME.first.jsonl [--markdown OUT.md] [--plot OUT.png] [--readme R]
    python -m tools.report RESULTS.json [--markdown OUT.md] [--plot OUT.png]
        [--model-plot OUT.png] [--readme README.md --readme docs/benchmarks.md]

A ``.first.jsonl`` (tools/first.py, the first GPU run) gives the matrix: per point, method and
mode, ours' p50 with its p20-p80 spread, its ratio to the bare frozen layer and to PEFT doing
the same method, each measured beside tools.model's prediction; the noise figure (the bare
layer's drift over each group), the calibration (full ÷ quick autotuning), the other figures,
the contenders missing and why, the correctness checks, and the run's setting (GPU, commit,
versions, autotune mode). The plot (default: beside the file, ``.png``) draws the fwd+bwd ratios
to bare per point. A pytest-benchmark JSON file gives the suites' tables.

--readme FILE (repeatable) rewrites the table between the "results" markers with the headline
cases (LLaMA-7B shapes, M = 8192, r in {16, 64}) of RESULTS.json, and, when RESULTS.json holds
model-level cases (benchmarks/test_model_level.py), the table between the "model-results"
markers, in each FILE that holds them (README.md holds "results", docs/benchmarks.md
"model-results"); a block no FILE has markers for is an error. A file with model-level cases
only leaves the "results" markers alone.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
MODEL_START, MODEL_END = "<!-- model-results:start -->", "<!-- model-results:end -->"


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


def model_cases(infos: list[dict]) -> list[dict]:
    """The model-level cases (benchmarks/test_model_level.py), in a stable order."""
    order = {"lora": 0, "lora_fa": 1, "lora_xs": 2}
    return sorted((i for i in infos if i.get("model_level")),
                  key=lambda i: (i["model"], i["base_dtype"] != "float32", i["dropout"],
                                 order.get(i["setup"], 9), i["setup"]))


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def model_table(infos: list[dict]) -> str:
    """One row per case and contender against the baseline (the first contender: PEFT):
    saved-activation MiB, training-step ms, CUDA peak MiB, each with its ratio, and the largest
    relative difference of the loss and the gradients (dropout off)."""
    rows = []
    for i in model_cases(infos):
        base, *others = i["contenders"]
        b = i["contenders"][base]
        for name in others:
            o = i["contenders"][name]
            diff = i.get(f"loss_rel_diff_{name}"), i.get(f"grad_rel_diff_{name}")
            rows.append([
                i["model"], i["setup"], i["base_dtype"], f"{i['dropout']:g}", name,
                f"{_mib(b['saved_bytes'])} / {_mib(o['saved_bytes'])}",
                _ratio(i.get(f"saved_bytes_{name}_over_{base}")),
                _mib(i.get("frozen_model_bytes")),
                _ratio(i.get(f"added_bytes_{name}_over_{base}")),
                f"{b['step_ms']:.1f} / {o['step_ms']:.1f}",
                _ratio(i.get(f"step_ms_{name}_over_{base}")),
                f"{_mib(b['peak_bytes'])} / {_mib(o['peak_bytes'])}",
                _ratio(i.get(f"peak_bytes_{name}_over_{base}")),
                "n/a (dropout)" if diff[0] is None else f"{diff[0]:.1e} / {diff[1]:.1e}"])
    return _table(["model", "setup", "base", "dropout", "vs PEFT", "saved MiB PEFT / ours",
                   "bytes ×PEFT", "frozen model MiB", "added bytes ×PEFT", "step ms PEFT / ours", "time ×PEFT", "peak MiB PEFT / ours",
                   "peak ×PEFT", "max rel. diff loss / grads"], rows)


def model_caption(infos: list[dict]) -> str:
    cases = model_cases(infos)
    if not cases:
        return ""
    shapes = {}
    for i in cases:
        s = i["shape"]
        shapes[i["model"]] = (f"{i['model']}: {s['layers']} layers, d = {s['d']}, FFN {s['ff']}, "
                              f"r = {s['rank']}, batch {s['batch']} x {s['seq']}")
    first = cases[0]
    return (f"Device: {first['device']}, {first['threads']} thread(s); "
            + "; ".join(shapes.values())
            + f". Adapters fp32 over the base dtype; step = forward + backward + AdamW step, "
            f"median of {first['repeats']} (the contenders alternate); ratios are ours / PEFT "
            "in the same run (lower is better). Frozen model: what the model keeps by itself "
            "(adapters off, a gradient through its input embeddings), which no adapter can "
            "avoid; added bytes = (saved − frozen model) ours / PEFT's.")


def markdown(machine: dict, infos: list[dict]) -> str:
    device = next((i["device"] for i in infos if "device" in i), "unknown")
    sections = [
        ("## Throughput", throughput_table(infos)),
        ("## Saved activations and peak memory per layer", memory_table(infos)),
        ("## LLaMA-style stack, all seven projections adapted, until out of memory",
         stack_table(infos)),
        ("## Python-layer overhead per call (tiny CPU tensors, same run)", overhead_table(infos)),
        ("## Whole models: PEFT vs enable_fused\n\n" + model_caption(infos), model_table(infos)),
    ]
    # a results file of one suite alone (e.g. the model-level one) leaves the others' tables out
    kept = [f"{title}\n\n{table}" for title, table in sections if table.count("\n") > 1]
    header = [] if not any("ratio_to_linear" in i for i in infos) and model_cases(infos) else [
        f"Device: {device}. Ratios are median times over the bare frozen nn.Linear of the same "
        "shape, measured in the same run (lower is better; 1.0 is the floor)."]
    return "\n\n".join(header + kept) + "\n"


def plot(infos: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [i for i in infos if "ratio_to_linear" in i and i["impl"] != "linear"]
    modes = sorted({i["mode"] for i in cases})
    if not modes:  # no throughput case in this file (e.g. model-level results only)
        return
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
    plt.close(fig)


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def plot_models(infos: list[dict], out: Path) -> None:
    """Bars per model-level case: saved bytes, step time (and CUDA peak) as ours / PEFT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = model_cases(infos)
    if not cases:
        return
    labels = [f"{i['model']} {i['setup']}\n"
              f"{_SHORT.get(i['base_dtype'], i['base_dtype'])} p={i['dropout']:g}" for i in cases]
    series = [("saved bytes", "saved_bytes"), ("step time", "step_ms"), ("CUDA peak", "peak_bytes")]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(cases)), 4.5))
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        values = [i.get(f"{key}_fused_over_peft") for i in cases]
        if all(v is None for v in values):
            continue
        ax.bar([x + (k - 1) * width for x in range(len(cases))],
               [float("nan") if v is None else v for v in values], width, label=label)
    ax.axhline(1.0, color="grey", linestyle="--")
    ax.set_xticks(range(len(cases)), labels, fontsize=7, rotation=60)
    ax.set_ylabel("enable_fused / plain PEFT")
    ax.set_title(f"Whole models, {cases[0]['device']}: ours / PEFT (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _replace_blocks(files: list, blocks: dict) -> None:
    """Each (start, end) -> block into every file holding those markers; SystemExit (nothing
    written) when some block's markers are in none of the files."""
    texts = {f: f.read_text() for f in files}
    for (start, end), block in blocks.items():
        holders = [f for f, text in texts.items() if start in text]
        if not holders:
            raise SystemExit(f"none of {', '.join(map(str, files))} has {start} ... {end} "
                             "markers")
        for f in holders:
            texts[f] = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block,
                              texts[f], flags=re.S)
    for f, text in texts.items():
        _write(f, text)


def update_readme(files: list, infos: list[dict], source: str) -> None:
    """The results tables of ``infos`` into the marked blocks of ``files`` (README.md, the
    docs' benchmarks page)."""
    blocks = {}
    models = model_cases(infos)
    if not models or any("ratio_to_linear" in i for i in infos):
        table = (throughput_table(infos, headline) if any(map(headline, infos))
                 else throughput_table(infos))
        blocks[START, END] = f"{START}\nFrom `{source}`:\n\n{table}\n{END}"
    if models:
        blocks[MODEL_START, MODEL_END] = (f"{MODEL_START}\nFrom `{source}`. "
                                          f"{model_caption(infos)}\n\n{model_table(infos)}\n"
                                          f"{MODEL_END}")
    _replace_blocks(files, blocks)


def _write(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename: a failed write leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _plot_to(draw, infos, out: Path) -> None:
    """draw(infos, tmp) into a temporary PNG renamed over ``out`` (nothing drawn: nothing)."""
    tmp = out.with_name(out.stem + ".tmp.png")
    draw(infos, tmp)
    if tmp.exists():
        tmp.replace(out)


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def first_report(args) -> None:
    """A .first.jsonl: the matrix and the rest as markdown (printed, or --markdown), the plot
    (--plot, default beside the file), the README's results table (--readme)."""
    from tools import matrix_report
    rows = matrix_report.load(args.results)
    text = matrix_report.markdown(rows)
    if args.markdown:
        _write(args.markdown, text)
    print(text)
    out = args.plot or args.results.with_name(args.results.name.removesuffix(".jsonl") + ".png")
    if _can_plot():
        _plot_to(matrix_report.plot, rows, out)
        print(f"plot: {out}" if out.exists() else "plot: no matrix rows to draw")
    else:  # a lent GPU machine may lack it: the table is the report, the plot is drawn later
        print(f"plot: skipped, matplotlib is not installed here (python -m tools.report "
              f"{args.results.name} where it is)")
    if args.readme:
        block = (f"{START}\nFrom `{args.results.as_posix()}`. {matrix_report.setting(rows)}\n\n"
                 f"{matrix_report.matrix_table(rows)}\n{END}")
        _replace_blocks(args.readme, {(START, END): block})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path,
                        help="NAME.first.jsonl (tools.first), or pytest-benchmark JSON "
                             "(--benchmark-json)")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of the ratios here")
    parser.add_argument("--model-plot", type=Path,
                        help="write a PNG plot of the model-level ratios (ours / PEFT) here")
    parser.add_argument("--readme", type=Path, action="append",
                        help="refresh the results tables in this file (repeatable: README.md, "
                             "docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if args.results.name.endswith(".jsonl"):
        first_report(args)
        return
    machine, infos = load(args.results)
    text = markdown(machine, infos)
    if args.markdown:
        _write(args.markdown, text)
    else:
        print(text)
    if args.plot:
        _plot_to(plot, infos, args.plot)
    if args.model_plot:
        _plot_to(plot_models, infos, args.model_plot)
    if args.readme:
        update_readme(args.readme, infos, args.results.as_posix())


if __name__ == "__main__":
    main()
