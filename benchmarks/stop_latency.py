"""How long `stop_real_time_generate` takes to end a parked `real_time_generate` loop in a large Python heap.

A full `gc.collect()` costs time in proportion to the live objects (a long notebook session, a long test run).
Two stops alternate in one process, on one model and one heap:

* **ours**: as shipped: the loop drops its session, which reference counting frees at once, so it skips the
  full collection (it collects only when a reference cycle keeps the session alive) and empties the CUDA cache;
* **always collecting**: the loop runs a full `gc.collect()` after dropping its session, as it did in sessions
  9-14 (CI's parked-stop test took 1.8 s against its 1.0 s bound on a slow machine because of it).

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
from mossvl_lab.streaming import threads

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "video-preview-tiny"


def stop_seconds(model, processor, always_collect: bool) -> float:
    """Start a loop with no input (it parks after its first <|silence|>), stop it from another thread, return the
    seconds until the loop's thread is gone."""
    shipped = threads._release_memory
    if always_collect:
        threads._release_memory = lambda collect=True: shipped(collect=True)
    try:
        tokens: queue.Queue = queue.Queue()
        loop = threading.Thread(target=model.real_time_generate,
                                args=(queue.Queue(), queue.Queue(), tokens, processor))
        loop.start()
        tokens.get(timeout=30)  # parked
        started = time.perf_counter()
        threading.Thread(target=model.stop_real_time_generate).start()
        loop.join(timeout=60)
        elapsed = time.perf_counter() - started
    finally:
        threads._release_memory = shipped
    if loop.is_alive():
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
    ours, always = [], []
    for _ in range(args.rounds):
        ours.append(stop_seconds(model, processor, always_collect=False))
        always.append(stop_seconds(model, processor, always_collect=True))
    ours_s, always_s = statistics.median(ours), statistics.median(always)
    print(f"stop -> loop ended, median of {args.rounds}: ours {ours_s:.4f} s | always collecting "
          f"{always_s:.4f} s | ratio {always_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
