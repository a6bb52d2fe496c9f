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
import time
from pathlib import Path

import numpy as np
import torch

import mossvl_lab as ml
from mossvl_lab.training import trainer
from mossvl_lab.training.batching import collate, weighted_lm_loss
from mossvl_lab.training.grouping import group_by_length

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RECIPES = {"video-preview-tiny": {}, "moss-vl-tiny": {"offline_qa_fraction": 0.3, "offline_qa_turns": 4}}


def run_batches(model, optimizer, batches) -> float:
    """Median seconds of one training step over `batches` (lists of samples)."""
    times = []
    for samples in batches:
        inputs = collate(samples, model.config.family, model.config.tokens.pad_token_id)
        labels = inputs.pop("labels")
        inputs.pop("decisions"), inputs.pop("replies")
        started = time.perf_counter()
        loss_sum, count = weighted_lm_loss(model(**inputs, dedup_frames=True).logits, labels,
                                           model.config.tokens.silence_token_id)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / count).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
    for name, recipe in RECIPES.items():
        model = ml.load_model(CHECKPOINTS / name, progress=False).train()
        processor = ml.load_processor(CHECKPOINTS / name)
        cfg = trainer.TrainConfig(event_rate=0.4, batch_size=args.batch_size, **recipe)
        size = trainer.default_frame_size(processor)
        samples = [trainer.make_sample(i, cfg, processor, model.config, size)
                   for i in range(args.steps * args.batch_size)]
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
