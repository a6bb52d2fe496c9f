"""How long `stop_real_time_generate` takes to end a parked `real_time_generate` loop in a large Python heap.

A stop ends with a full `gc.collect()`, whose cost grows with the number of live objects (a long notebook
session, a long test run). Two stops alternate in one process, on one model and one heap:

* **ours**: `stop_real_time_generate` as shipped (the loop collects once, after dropping its session);
* **also collecting in the caller**: the same, plus a `gc.collect()` in the stopping thread right after it, as
  the stop did before session 9; the two collections then compete for the GIL.

Reports the median time from the stop call until the loop's thread has ended, and their ratio.
Usage: python benchmarks/stop_latency.py [--objects 3000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import queue
import statistics
import threading
import time
from pathlib import Path

import mossvl_lab as ml

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "video-preview-tiny"


def stop_seconds(model, processor, caller_collects: bool) -> float:
    """Start a loop with no input (it parks after its first <|silence|>), stop it from another thread, return the
    seconds until the loop's thread is gone."""
    tokens: queue.Queue = queue.Queue()
    loop = threading.Thread(target=model.real_time_generate, args=(queue.Queue(), queue.Queue(), tokens, processor))
    loop.start()
    tokens.get(timeout=30)  # parked

    def stop() -> None:
        model.stop_real_time_generate()
        if caller_collects:
            gc.collect()

    started = time.perf_counter()
    stopper = threading.Thread(target=stop)
    stopper.start()
    loop.join(timeout=60)
    elapsed = time.perf_counter() - started
    stopper.join(timeout=60)
    if loop.is_alive() or stopper.is_alive():
        raise RuntimeError("a stopped loop did not end within 60 s")
    return elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=3_000_000, help="small container objects kept alive")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model, processor = ml.load_model(CHECKPOINT, progress=False).eval(), ml.load_processor(CHECKPOINT)
    heap = [{"i": i} for i in range(args.objects)]  # tracked by the collector, like a big notebook's objects
    started = time.perf_counter()
    gc.collect()
    print(f"{len(heap)} extra objects; one full gc.collect(): {time.perf_counter() - started:.3f} s")
    ours, both = [], []
    for _ in range(args.rounds):
        ours.append(stop_seconds(model, processor, caller_collects=False))
        both.append(stop_seconds(model, processor, caller_collects=True))
    ours_s, both_s = statistics.median(ours), statistics.median(both)
    print(f"stop -> loop ended, median of {args.rounds}: ours {ours_s:.3f} s | also collecting "
          f"in the caller {both_s:.3f} s | ratio {both_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
