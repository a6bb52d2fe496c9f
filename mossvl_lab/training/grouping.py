"""Length-grouped batches: the samples of a window of steps, sorted by token length and cut into batches.

A batch pads every sequence to its longest one, and training clips run 8-20 s, so a batch of random clips is about
a quarter padding (the shipped moss-vl-tiny recipe: 26.5% of its tokens). Sorting a window's samples by length
and cutting the sorted run into batches keeps similar lengths together; consecutive runs of the sorted order give
the smallest total padding of any split into equal batches. The batches then go in a random order, so a window
does not step from short to long clips. Every sample of the window is used once, in exactly one step.
`benchmarks/length_grouping.py` measures the step time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .streams import TrainingSample


def group_by_length(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """lengths [sample] (a multiple of batch_size) -> batches of sample positions: consecutive runs of the order by
    (length, position), the runs in a random order."""
    if batch_size < 1 or len(lengths) % batch_size:
        raise ValueError(f"{len(lengths)} samples do not split into batches of {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    runs = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [runs[i] for i in rng.permutation(len(runs))]


class StepSamples:
    """The samples of each step for one rank. window 0: global samples step * batch_size onward, in index order.
    window W: the W * batch_size samples of steps [k W, (k + 1) W) are built at the window's first step and
    grouped by length (the window is cut short at the last step).

    Under data parallelism every rank builds the whole window (grouping needs every length) and takes its slice of
    each grouped batch, so the global batch of a step does not depend on the number of processes."""

    def __init__(self, make: Callable[[int], TrainingSample], *, batch_size: int, steps: int, window: int,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        if window < 0:
            raise ValueError(f"window must be >= 0 steps, got {window}")
        self.make, self.batch_size, self.steps, self.window = make, batch_size, steps, window
        self.seed, self.per_rank, self.rank = seed, batch_size // world_size, rank
        self._start: int | None = None
        self._batches: list[list[TrainingSample]] = []

    def __call__(self, step: int) -> list[TrainingSample]:
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        if not self.window:
            first = step * self.batch_size
            return [self.make(i) for i in range(first, first + self.batch_size)[mine]]
        start = step - step % self.window
        if start != self._start:
            count = min(self.window, self.steps - start) * self.batch_size
            samples = [self.make(i) for i in range(start * self.batch_size, start * self.batch_size + count)]
            rng = np.random.default_rng([self.seed, start])
            batches = group_by_length([len(s.input_ids) for s in samples], self.batch_size, rng)
            self._start, self._batches = start, [[samples[i] for i in batch] for batch in batches]
        return self._batches[step - start][mine]
