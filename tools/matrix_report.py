"""The first GPU run's report: ``NAME.first.jsonl`` (tools/first.py) as markdown and a plot.

Used through ``python -m tools.report NAME.first.jsonl``. Everything is read from the rows: the
ratios from the "ratio" rows (same group, same interleaved timing), the times and spreads from
the "time" rows, the predictions beside them (tools.model's, for the real shapes).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

MATRIX_METHODS = ("lora", "lora_fa", "lora_xs", "dora", "dora_fa", "qlora", "qlora_fa")


def load(path) -> list:
    """The rows of a .first.jsonl (a line cut by a kill is left out)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _ratio(row) -> str:
    """measured (predicted) of a ratio row, or empty."""
    if row is None:
        return ""
    pred = row.get("predicted")
    return f"{row['measured']:.3f}" + (f" ({pred:.2f})" if pred is not None else "")


def _ms(row) -> str:
    if row is None:
        return ""
    text = f"{row['p50_ms']:.3f} [{row['p20_ms']:.3f}–{row['p80_ms']:.3f}]"
    if row.get("predicted_ms") is not None:
        text += f" ({row['predicted_ms']:.3f})"
    return text


def setting(rows) -> str:
    """One paragraph: where and what ran (GPU, commit, versions, autotune, timing)."""
    env = next((r for r in rows if r.get("kind") == "env"), {})
    plan = next((r for r in rows if r.get("kind") == "plan"), {})
    summary = next((r for r in reversed(rows) if r.get("kind") == "summary"), {})
    versions = env.get("versions", {})
    shown = ", ".join(f"{n} {versions.get(n) or 'absent'}" for n in
                      ("torch", "triton", "peft", "transformers", "bitsandbytes"))
    modes = sorted({str(r.get("autotune")) for r in rows if r.get("kind") == "time"})
    commits = sorted({str(r.get("commit")) for r in rows if "commit" in r})
    parts = [f"GPU: {env.get('gpu', 'unknown')}"
             + (f" ({env['l2_cache_mib']} MiB L2, {env.get('sms')} SMs)" if env.get("l2_cache_mib")
                else ""),
             f"commit {', '.join(commits) or 'unknown'}", shown,
             f"timings under autotune {', '.join(modes) or 'n/a'}"]
    if plan.get("dry_run"):
        parts.append("DRY RUN: CPU stand-in shapes on the wall clock, one round: the figures "
                     "check the code path and say nothing about speed")
    if summary:
        parts.append(f"run {summary.get('wall_s')} s of {summary.get('limit_s')} s, failed "
                     f"steps {summary.get('failed_steps') or 'none'}")
    return ". ".join(parts) + "."


def matrix_table(rows) -> str:
    """Ours per matrix group, method and mode: p50 [p20–p80] (predicted) ms, × bare, × PEFT,
    × bitsandbytes' Linear4bit, PEFT × bare, the cold first call."""
    times = {(r["group"], r["contender"], r["mode"]): r for r in rows if r.get("kind") == "time"
             and str(r.get("group", "")).startswith("matrix")}
    ratios = {(r["group"], r["contender"], r["mode"], r["against"]): r for r in rows
              if r.get("kind") == "ratio"}
    body = []
    for (group, contender, mode), t in times.items():
        if t.get("role") != "ours":
            continue
        method = t["method"]
        peft = next((k[3] for k in ratios if k[:3] == (group, contender, mode)
                     and k[3].startswith("peft")), None)
        peft_ratio = ratios.get((group, contender, mode, peft)) if peft else None
        peft_bare = ratios.get((group, peft, mode, "bare")) if peft else None
        cold = t.get("first_call_ms")
        body.append([
            group.removeprefix("matrix "), method, t.get("backend"), mode, _ms(t),
            _ratio(ratios.get((group, contender, mode, "bare"))),
            _ratio(peft_ratio) + (" †" if peft_ratio and peft_ratio.get("note") else ""),
            _ratio(ratios.get((group, contender, mode, "bare-4bit"))),
            _ratio(peft_bare), "" if cold is None else f"{cold / 1e3:.2f}"])
    order = {m: i for i, m in enumerate(MATRIX_METHODS)}
    body.sort(key=lambda r: (list(dict.fromkeys(k[0] for k in times)).index("matrix " + r[0]),
                             r[3], order.get(r[1], 99), str(r[2])))
    return _table(["point", "method", "backend", "mode", "ours ms p50 [p20–p80] (pred.)",
                   "× bare (pred.)", "× PEFT (pred.)", "× bnb Linear4bit", "PEFT × bare (pred.)",
                   "cold first call s"], body)


def noise_table(rows) -> str:
    body = [[r["group"], r["mode"], f"{r['bare_start_ms']:.3f}", f"{r['bare_end_ms']:.3f}",
             f"{100 * r['drift']:+.1f} %"] for r in rows if r.get("kind") == "noise"]
    return _table(["group", "mode", "bare at start ms", "bare at end ms", "drift"], body)


def calibration_table(rows) -> str:
    body = [[r["contender"], r["mode"], f"{r['tuned_over_quick']:.3f}"] for r in rows
            if r.get("kind") == "calibration"]
    return _table(["full autotuning", "mode", "tuned ÷ quick (p50)"], body)


def figures_table(rows) -> str:
    body = []
    for r in rows:
        if r.get("kind") != "figure":
            continue
        if "p50_ms" in r:
            value = _ms(r) + (f", {r['tflops']} TFLOP/s" if "tflops" in r else "") + (
                f", {r['tb_s_read_plus_write']} TB/s" if "tb_s_read_plus_write" in r else "")
        elif "timed" in r:  # a first training step: its time and what it timed
            timed = ", ".join(f"{n} {what}" for what, n in r["timed"].items())
            value = (f"{r['ms'] / 1e3:.2f} s, timed: {timed} ({r.get('model')}, "
                     f"{r.get('tokens')} tokens)")
        elif "steady" in r:
            value = f"{r['steady']['p50_ms']:.1f} ms ({r.get('model')}, {r.get('tokens')} tokens)"
        elif "winners" in r:
            value = "keys won: " + (", ".join(f"{b} {n}" for b, n in r["winners"].items())
                                    or "none")
        elif "skipped" in r:
            value = f"skipped: {r['skipped']}"
        elif r.get("model_level"):
            value = ", ".join(f"{key.split('_fused')[0].replace('_', ' ')} {r[key]:.3f}× PEFT"
                              for key in ("step_ms_fused_over_peft",
                                          "saved_bytes_fused_over_peft",
                                          "peak_bytes_fused_over_peft")
                              if isinstance(r.get(key), (int, float)))
        else:
            value = json.dumps({k: v for k, v in r.items() if k not in (
                "group", "kind", "name", "step", "commit", "autotune")}, default=str)[:200]
        where = f" {r['point']}" if r.get("point") else ""
        body.append([r["group"], f"{r['name']}{where}", value])
    return _table(["group", "figure", "p50 [p20–p80] (pred.) ms / value"], body)


def missing_table(rows) -> str:
    """Contenders and groups that did not run, once per reason."""
    seen = defaultdict(list)
    for r in rows:
        if r.get("kind") == "missing" or (r.get("kind") == "group"
                                          and r.get("status") not in ("done", "started")):
            reason = r.get("skipped") or r.get("error") or r.get("status")
            seen[(r.get("contender") or r.get("group") or "", reason)].append(r.get("group", ""))
        elif r.get("kind") == "fatal":
            seen[(r.get("contender", ""), "CUDA error: " + r.get("error", ""))].append(r["group"])
    body = [[what, reason, len(groups)] for (what, reason), groups in seen.items()]
    return _table(["contender / group", "why not", "times"], body)


def checks_line(rows) -> str:
    checks = [r for r in rows if "ok" in r and r.get("step") in ("correctness", "cuda")]
    failed = [r for r in checks if not r["ok"]]
    skipped = [r for r in rows if r.get("step") == "correctness" and "skipped" in r]
    text = (f"{len(checks) - len(failed)} passed, {len(failed)} failed, {len(skipped)} skipped "
            "(correctness against float64 under the tests' tolerance rule)")
    return text + "".join(f"\n- failed: {r['name']}"
                          + (f" (known: {r['known_failure']})" if r.get("known_failure") else "")
                          + (f": {r['error']}" if r.get("error") else "") for r in failed)


def markdown(rows) -> str:
    sections = [
        ("## Setting", setting(rows)),
        ("## The matrix (M = 8192, bf16 base, fp32 adapters, bf16 autocast)",
         "Times in ms: p50 [p20–p80] (tools.model's prediction); ratios are p50 over p50 in the "
         "same interleaved timing, measured (predicted). † LoRA-XS against PEFT LoRA of the same "
         "rank (PEFT has no LoRA-XS).\n\n" + matrix_table(rows)),
        ("## Noise: the bare layer at each group's start and end", noise_table(rows)),
        ("## Calibration: full autotuning over quick", calibration_table(rows)),
        ("## Other figures", figures_table(rows)),
        ("## Not measured, and why", missing_table(rows)),
        ("## Correctness", checks_line(rows)),
    ]
    return "\n\n".join(f"{title}\n\n{text}" for title, text in sections) + "\n"


def plot(rows, out: Path) -> None:
    """fwd+bwd time over the bare layer per matrix point: ours and PEFT per method, p20-p80 as
    error bars, tools.model's prediction as a marker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r for r in rows if r.get("kind") == "ratio" and r.get("against") == "bare"
              and r.get("mode") == "fwd+bwd" and str(r.get("group", "")).startswith("matrix")]
    groups = list(dict.fromkeys(r["group"] for r in ratios))
    if not groups:
        return
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4.4 * rows_n), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups):
        chosen = [r for r in ratios if r["group"] == group]
        labels = [("ours " if r["contender"].startswith("ours") else "PEFT ")
                  + r["method"] + ("" if r["contender"].startswith(("ours-triton", "peft"))
                                   else f" ({r['contender'].split()[0][5:]})") for r in chosen]
        values = [r["measured"] for r in chosen]
        low = [max(0.0, r["measured"] - r["spread"][0]) for r in chosen]
        high = [max(0.0, r["spread"][1] - r["measured"]) for r in chosen]
        colours = ["tab:blue" if r["contender"].startswith("ours") else "tab:orange"
                   for r in chosen]
        ax.bar(range(len(chosen)), values, yerr=[low, high], color=colours, capsize=2)
        predicted = [(i, r["predicted"]) for i, r in enumerate(chosen) if r["predicted"]]
        if predicted:
            ax.plot(*zip(*predicted), "k_", markersize=12, label="predicted")
            ax.legend(fontsize=7)
        ax.axhline(1.0, color="grey", linestyle="--")
        ax.set_xticks(range(len(chosen)), labels, fontsize=6, rotation=70)
        ax.set_title(group.removeprefix("matrix "), fontsize=9)
    for row in axes:
        row[0].set_ylabel("fwd+bwd time / bare frozen layer")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
