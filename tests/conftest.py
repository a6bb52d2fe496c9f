"""Shared fixtures: tiny configs and models, synthetic frames. Everything runs on CPU in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mossvl_lab as ml


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (directories whose tests train or stream make it autouse): the CPU is
    shared, and one thread is several times faster than two fighting over cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config():
    return ml.config.preset("video-preview-tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return ml.build_model(tiny_config).eval()


@pytest.fixture
def synthetic_frames():
    """Eight 56x56 RGB uint8 frames of a square moving left to right over a grey background."""
    frames = np.full((8, 56, 56, 3), 96, dtype=np.uint8)
    for i in range(8):
        frames[i, 20:36, 4 + 5 * i:20 + 5 * i] = (220, 40, 40)
    return frames

