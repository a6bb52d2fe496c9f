"""Length-grouped batches: every sample used once, less padding than index order, the same global batch at any
number of processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mossvl_lab.training.grouping import StepSamples, group_by_length
from mossvl_lab.training.streams import TrainingSample
from mossvl_lab.training.trainer import TrainConfig


def padded_tokens(lengths, batches):
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_groups_are_sorted_runs_and_pad_less_than_index_order():
    rng = np.random.default_rng(0)
    for trial in range(20):
        lengths = rng.integers(50, 400, size=32).tolist()
        batches = group_by_length(lengths, 8, np.random.default_rng(trial))
        assert sorted(i for batch in batches for i in batch) == list(range(32))
        ranked = sorted(lengths)
        # each batch holds a run of the sorted lengths: its sorted lengths equal some slice of the sorted window
        for batch in batches:
            mine = sorted(lengths[i] for i in batch)
            assert any(ranked[k:k + 8] == mine for k in range(0, 32, 8))
        index_order = [list(range(k, k + 8)) for k in range(0, 32, 8)]
        assert padded_tokens(lengths, batches) <= padded_tokens(lengths, index_order)
    with pytest.raises(ValueError, match="batches of 8"):
        group_by_length([1, 2, 3], 8, np.random.default_rng(0))


def _fake_sample(index: int) -> TrainingSample:
    length = 10 + (index * 37) % 23  # varied, deterministic lengths
    return TrainingSample(input_ids=torch.full((length,), index), labels=torch.full((length,), index))


def _indices(samples):
    return [int(s.input_ids[0]) for s in samples]


@pytest.mark.parametrize("window", [0, 3])
def test_every_sample_once_and_ranks_split_the_global_batch(window):
    steps, batch = 7, 4  # 7 steps: the last window of 3 is cut short to 1
    built = []

    def make(i):
        built.append(i)
        return _fake_sample(i)

    whole = StepSamples(make, batch_size=batch, steps=steps, window=window, seed=0)
    halves = [StepSamples(_fake_sample, batch_size=batch, steps=steps, window=window, seed=0, rank=r, world_size=2)
              for r in range(2)]
    used = []
    for step in range(steps):
        global_batch = _indices(whole(step))
        assert len(global_batch) == batch
        assert _indices(halves[0](step)) + _indices(halves[1](step)) == global_batch
        used += global_batch
    assert sorted(used) == list(range(steps * batch))
    assert sorted(built) == list(range(steps * batch))  # each sample built once per process
    if window == 0:
        assert used == list(range(steps * batch))
    else:
        assert used != list(range(steps * batch))  # grouping reorders within windows
        assert sorted(used[:3 * batch]) == list(range(3 * batch))  # ...but never across them


def test_train_config_rejects_a_negative_window():
    with pytest.raises(ValueError, match="group_by_length"):
        TrainConfig(group_by_length=-1)
