"""Training step time with length-grouped batches (`--group-by-length`) vs batches in index order, on the shipped
tiny checkpoints and their recipes' synthetic clips.

One window of samples (steps x batch size) is cut into batches twice: in index order (what the trainer does by
default) and grouped by length (`grouping.group_by_length`). Both sets run forward, the weighted loss, backward
and an AdamW step, alternating in one process; the report is each set's padding share and median seconds per
step, and their ratio.
Usage: python benchmarks/length_grouping.py [--steps 8] [--rounds 3] [--batch-size 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from mossvl_lab.training.grouping import group_by_length
from shipped_recipes import RECIPES, load_with_samples, model_inputs, step_seconds


def run_batches(model, optimizer, batches) -> float:
    """Median seconds of one training step over `batches` (lists of samples)."""
    return statistics.median(step_seconds(model, optimizer, *model_inputs(model, samples)) for samples in batches)


def padding_share(batches) -> float:
    real = sum(len(s.input_ids) for batch in batches for s in batch)
    padded = sum(max(len(s.input_ids) for s in batch) * len(batch) for batch in batches)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in RECIPES:
        model, samples = load_with_samples(name, args.batch_size, args.steps * args.batch_size)
        index_order = [samples[i:i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
        grouped = [[samples[i] for i in batch] for batch in
                   group_by_length([len(s.input_ids) for s in samples], args.batch_size, np.random.default_rng(0))]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # tiny steps: the model barely moves
        run_batches(model, optimizer, index_order[:2])  # warm-up, not timed
        medians = {"index order": [], "grouped": []}
        for _ in range(args.rounds):
            medians["index order"].append(run_batches(model, optimizer, index_order))
            medians["grouped"].append(run_batches(model, optimizer, grouped))
        plain, fast = (statistics.median(medians[k]) for k in ("index order", "grouped"))
        print(f"{name}: padding {padding_share(index_order):.1%} -> {padding_share(grouped):.1%}; "
              f"s/step index order {plain:.3f}, grouped {fast:.3f}; {plain / fast:.2f}x")


if __name__ == "__main__":
    main()
