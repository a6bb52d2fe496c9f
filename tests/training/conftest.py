"""Training tests run on one torch thread (the root conftest's `one_thread`)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
