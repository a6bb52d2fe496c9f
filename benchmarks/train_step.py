"""Training step time with the vision tower run once per distinct frame (`dedup_frames=True`, what the trainer
does) vs once per frame, on the shipped tiny checkpoints and a batch of synthetic training clips.

The clips are the shipped recipes' (events at 0.4 per second, MOSS-VL with a share of offline questions), so most
frames repeat the one before (a static scene) and a batch pads its shorter clips with zero frames. Both variants
run forward, the weighted loss, backward and an AdamW step, alternating in one process on the same batch; the
report is the median seconds per step of each and their ratio.
Usage: python benchmarks/train_step.py [--rounds 5] [--batch-size 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from shipped_recipes import RECIPES, load_with_samples, model_inputs, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in RECIPES:
        model, samples = load_with_samples(name, args.batch_size, args.batch_size)
        batch, labels = model_inputs(model, samples)
        frames: list[int] = []  # frames the tower is called on (MOSS-VL: one grid_thw row each)
        model.vision.register_forward_pre_hook(
            lambda _m, args: frames.append(int(args[1].shape[0]) if args[0].dim() == 2 else args[0].shape[:2].numel()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)  # tiny steps: the model barely moves
        times: dict[bool, list[float]] = {True: [], False: []}
        seen = {}
        for dedup in (True, False):  # warm-up, not timed
            frames.clear()
            step_seconds(model, optimizer, batch, labels, dedup)
            seen[dedup] = sum(frames)
        for _ in range(args.rounds):
            for dedup in (True, False):
                times[dedup].append(step_seconds(model, optimizer, batch, labels, dedup))
        ours, every = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name}: batch {args.batch_size} | tower frames {seen[False]} -> {seen[True]} distinct "
              f"| distinct frames {ours:.3f} s/step | every frame {every:.3f} s/step "
              f"| ratio {every / ours:.2f}x")


if __name__ == "__main__":
    main()
