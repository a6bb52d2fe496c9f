"""Tables and plots of an ablation: per-run CSV, per-variant mean ± std over seeds, bar charts, a markdown table.

Files written into the ablation's output directory:

    results.csv    one row per finished run: variant, seed, every Metrics rate and count, train/eval seconds, loss
    summary.json   {variant: {runs, metrics: {name: {mean, std, n}}}} over SUMMARY_METRICS
    summary.csv    one row per variant: runs, <metric>_mean, <metric>_std, <metric>_n
    plots/<metric>.png   a bar per variant, error bars = std over seeds

A rate that is undefined in a run (e.g. caption exact match when nothing was recalled) is left out of that
variant's mean and std; `n` says how many seeds defined it. std is the sample standard deviation (ddof=1), NaN
(null in JSON, empty in CSV) with fewer than two values.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .ablate import AblationSpec, write_json
from .metrics import Metrics

SUMMARY_METRICS = (*Metrics.RATES, "final_loss", "train_seconds", "eval_seconds")
COUNTS = tuple(f.name for f in dataclasses.fields(Metrics))
# markdown table columns: (header, metric, shown as a percentage)
TABLE = (("recall", "event_recall", True), ("false alarms", "false_alarm_rate", True),
         ("caption EM", "caption_exact_match", True), ("TS-QA", "qa_accuracy", True),
         ("delay (frames)", "mean_delay_frames", False))


def collect(spec: AblationSpec, out: Path) -> list[dict[str, Any]]:
    """One flat row per finished run of the spec (spec order: variant-major, then seed)."""
    rows = []
    for variant in spec.variants:
        for seed in spec.seeds:
            path = out / "runs" / variant.name / f"seed{seed}" / "metrics.json"
            if path.exists():
                record = json.loads(path.read_text())
                rows.append({"variant": variant.name, "seed": seed, **record["metrics"],
                             **{k: record[k] for k in ("final_loss", "train_seconds", "eval_seconds")}})
    return rows


def _stats(values: list[float]) -> dict[str, float | int]:
    defined = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    mean = float(defined.mean()) if defined.size else math.nan
    std = float(defined.std(ddof=1)) if defined.size >= 2 else math.nan
    return {"mean": mean, "std": std, "n": int(defined.size)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{variant: {"runs": n, "metrics": {metric: {"mean", "std", "n"}}}} in the rows' variant order."""
    out: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        out[variant] = {"runs": len(mine), "metrics": {m: _stats([r[m] for r in mine]) for m in SUMMARY_METRICS}}
    return out


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def _csv_cell(value: Any) -> Any:
    return "" if value is None or isinstance(value, float) and math.isnan(value) else value


def _write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # atomic like the run files: a reader never sees half a table
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows({k: _csv_cell(r.get(k)) for k in header} for r in rows)
    tmp.replace(path)


def plot_metric(summary: dict[str, dict[str, Any]], metric: str, path: Path, title: str = "") -> Path | None:
    """Bar chart of one metric over the variants (error bars: std over seeds); None when no run defines it."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no global backend switch

    names = [v for v in summary if summary[v]["metrics"][metric]["n"]]
    if not names:
        return None
    means = [summary[v]["metrics"][metric]["mean"] for v in names]
    stds = [np.nan_to_num(summary[v]["metrics"][metric]["std"]) for v in names]
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6))
    ax = fig.add_subplot()
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: {metric}" if title else metric)
    if metric in Metrics.RATES and metric != "mean_delay_frames":
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _cell(stats: dict[str, float | int], percent: bool) -> str:
    if not stats["n"]:
        return "n/a"
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 2)
    text = f"{scale * stats['mean']:.{digits}f}"
    if not math.isnan(stats["std"]):
        text += f" ± {scale * stats['std']:.{digits}f}"
    return text + unit


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """variant | recall | false alarms | caption EM | TS-QA | delay | seeds, each cell mean ± std over seeds."""
    lines = ["| variant | " + " | ".join(h for h, _, _ in TABLE) + " | seeds |",
             "|---" * (len(TABLE) + 2) + "|"]
    for variant, entry in summary.items():
        cells = [_cell(entry["metrics"][metric], percent) for _, metric, percent in TABLE]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {entry['runs']} |")
    return "\n".join(lines)


def write_report(spec: AblationSpec, out: Path) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Write results.csv, summary.json, summary.csv and the plots from the finished runs; (summary, files)."""
    rows = collect(spec, out)
    summary = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.csv", out / "summary.json", out / "summary.csv"]
    _write_csv(files[0], ["variant", "seed", *Metrics.RATES, *COUNTS, "final_loss", "train_seconds",
                          "eval_seconds"], rows)
    write_json(files[1], {"name": spec.name, "description": spec.description, "seeds": list(spec.seeds),
                          "variants": _json_ready(summary)})
    header = ["variant", "runs"] + [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std", "n")]
    _write_csv(files[2], header, [{"variant": v, "runs": e["runs"],
                                   **{f"{m}_{s}": e["metrics"][m][s] for m in SUMMARY_METRICS
                                      for s in ("mean", "std", "n")}} for v, e in summary.items()])
    for metric in SUMMARY_METRICS:
        plot = plot_metric(summary, metric, out / "plots" / f"{metric}.png", title=spec.name)
        if plot is not None:
            files.append(plot)
    return summary, files
