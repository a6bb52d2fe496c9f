"""The notebooks in notebooks/ run top to bottom on the shipped tiny checkpoints without an error cell.

Each notebook is executed with nbclient (what nbmake runs) in a fresh kernel of this interpreter, from notebooks/ as
Jupyter runs it, with HOME and every Jupyter / IPython / matplotlib directory in a temporary directory and one torch
thread. 07_real_checkpoint runs twice: without MOSSVL_CHECKPOINT (every cell says it skipped) and pointed at each
shipped tiny checkpoint (every cell runs: the real-checkpoint code path, for both families).
By hand: `pytest --nbmake notebooks/` (or Run All in JupyterLab).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHECKPOINTS = ROOT / "checkpoints"
EXPECTED = ("01_quickstart", "02_stepping", "03_attention", "04_kv_cache", "05_ablation", "06_webcam",
            "07_real_checkpoint")
KERNEL = "mossvl-lab-test"
CELL_TIMEOUT = 180  # seconds per cell: generous for a loaded 2-core machine; a hang still fails

# text a notebook's outputs must contain (beyond "no error cell"): what its main cell is there to show
MUST_SHOW = {
    "01_quickstart": ["expected at", "p(silence)="],
    "02_stepping": ["transcript:", "frames ingested"],
    "03_attention": ["frames, cross layers", "mean"],
    "04_kv_cache": ["formula:", "frames still cached"],
    "05_ablation": [re.compile(r"\b(\d+) of \1 runs finished")],
    "06_webcam": ["worker threads left: []", "no frame queued"],
}


def _notebook(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_the_notebooks_are_committed_clean():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for name in EXPECTED:
        nb = _notebook(name)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and nb.cells[0].cell_type == "markdown", f"{name}: starts with its explanation"
        dirty = [c.id for c in code if c.outputs or c.execution_count is not None]
        assert not dirty, f"{name}: cells {dirty} hold outputs; clear them before committing"


@pytest.fixture(scope="module")
def jupyter_home(tmp_path_factory):
    """A temporary HOME with a kernelspec that runs this interpreter's ipykernel."""
    home = tmp_path_factory.mktemp("jupyter-home")
    spec = home / "data" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mossvl-lab tests", "language": "python"}))
    return home


def _execute(name: str, jupyter_home: Path, tmp_path: Path, monkeypatch, checkpoint: Path | None = None):
    from nbclient import NotebookClient

    # the kernel inherits this environment: nothing of the real user's Jupyter setup, and no stray checkpoint
    for var, sub in (("HOME", ""), ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "matplotlib")):
        monkeypatch.setenv(var, str(jupyter_home / sub))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' scratch directories land in pytest's tmp
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    monkeypatch.delenv("MOSSVL_VIDEO", raising=False)
    if checkpoint is None:
        monkeypatch.delenv("MOSSVL_CHECKPOINT", raising=False)
    else:
        monkeypatch.setenv("MOSSVL_CHECKPOINT", str(checkpoint))
    nb = _notebook(name)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, startup_timeout=120, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) at the first error cell
    print(f"{name}: executed in {time.perf_counter() - started:.1f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # a widget thread that failed logs its traceback to stderr instead of raising in a cell
    stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "Traceback" not in stderr, stderr
    stdout = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    return nb, stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED[:-1])
def test_notebook_runs_top_to_bottom(name, jupyter_home, tmp_path, monkeypatch):
    nb, stdout = _execute(name, jupyter_home, tmp_path, monkeypatch)
    for text in MUST_SHOW[name]:
        found = text.search(stdout) if isinstance(text, re.Pattern) else text in stdout
        assert found, f"{name} no longer prints {text!r}"
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert last.outputs, f"{name}: its last cell shows nothing"


@pytest.mark.slow
def test_real_checkpoint_notebook_skips_cleanly_without_a_checkpoint(jupyter_home, tmp_path, monkeypatch):
    nb, stdout = _execute("07_real_checkpoint", jupyter_home, tmp_path, monkeypatch)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "MOSSVL_CHECKPOINT is not set" in stdout
    for cell in code[1:]:
        assert "skipped:" in "".join(o.get("text", "") for o in cell.outputs), cell.source


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["video-preview-tiny", "moss-vl-tiny"])
def test_real_checkpoint_notebook_runs_on_a_checkpoint_directory(checkpoint, jupyter_home, tmp_path, monkeypatch):
    nb, stdout = _execute("07_real_checkpoint", jupyter_home, tmp_path, monkeypatch, CHECKPOINTS / checkpoint)
    assert "skipped:" not in stdout and "loaded on cpu" in stdout
    widgets = [o for c in nb.cells for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 2  # the stepper and the attention view
