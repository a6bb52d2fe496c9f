"""`import mossvl_lab` must not pull in transformers, Jupyter or widget libraries (DESIGN §1)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "ipywidgets", "anywidget", "jupyterlab", "jupyter_client", "IPython", "matplotlib")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_light():
    assert not _loaded_after("import mossvl_lab") & set(HEAVY)


def test_building_and_running_a_model_stays_light():
    loaded = _loaded_after("import torch, mossvl_lab as ml; m = ml.build_model(ml.config.preset('video-preview-tiny')); "
                           "m(torch.tensor([[5, 6]]))")
    assert not loaded & set(HEAVY)
