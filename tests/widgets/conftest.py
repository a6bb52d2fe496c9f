"""Widget test setup: tiny streams shared by the widget tests (`mossvl_lab.widgets` is the top-level `widgets/`
folder, mapped by setup.py's package_dir, so these tests need the package installed: `pip install -e .`)."""

from __future__ import annotations

import pytest

import mossvl_lab as ml


@pytest.fixture(scope="module")
def tiny():
    """(model, processor) of a random video-preview-tiny model with every gate non-zero, shared by a module."""
    from reference import tiny_model

    model = tiny_model("video-preview-tiny", 0)
    return model, ml.processor_for_model(model.config)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
