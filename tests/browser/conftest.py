"""Real-browser fixtures: one JupyterLab server and one headless Chromium (with a fake camera) per test session.

- `lab`: JupyterLab on a free port with a random token, serving a temporary copy of notebooks/ (Run All would
  otherwise autosave outputs into the repository), HOME and every Jupyter / IPython directory in a temporary
  directory, `window.jupyterapp` exposed so tests can run JupyterLab commands. Stopped at the end: its kernels are
  shut down through its API, it is terminated (then killed), and kernels still alive are killed by pid.
- `browser`: the Debian system Chromium driven by playwright (never `playwright install`), its camera a generated
  Y4M clip of coloured squares moving over grey (Chromium loops it).
- `open_notebook(name)`: a fresh browser context on /lab/tree/<name>?reset and a `Notebook` to run all cells, run
  code in its kernel and find widgets; after a failed test a screenshot and the JupyterLab log go to ci-artifacts/.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from browser_lab import (CHROMIUM_ARGS, MEDIA_PROBE, ROOT, WAIT, Lab, Notebook, _free_port, _isolated_env, _stop,
                         _user_settings, wait_until, write_y4m)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("lab")
    home, root = base / "home", base / "root"
    root.mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, root / notebook.name)
    env = _isolated_env(home)
    settings, workspaces = home / "lab-settings", home / "lab-workspaces"
    _user_settings(settings)
    workspaces.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}",
               "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, home=home, log=log, process=process)

    def ready():
        if process.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return server.api("status", timeout=2)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    try:
        wait_until(ready, "the JupyterLab server to answer", timeout=120)
        yield server
    finally:
        _stop(server)


# ---------------------------------------------------------------------------------------------------- Chromium


@pytest.fixture(scope="session")
def fake_camera(tmp_path_factory) -> Path:
    return write_y4m(tmp_path_factory.mktemp("camera") / "squares.y4m")


@pytest.fixture(scope="session")
def browser(fake_camera):
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the browser tests need the Debian `chromium` package on PATH (apt-get install chromium)")
    args = CHROMIUM_ARGS + ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                            f"--use-file-for-fake-video-capture={fake_camera}"]
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=executable, args=args, timeout=WAIT * 1000)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


# ---------------------------------------------------------------------------------------------------- notebooks


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def open_notebook(lab, browser, request):
    """open_notebook(name) -> Notebook in a fresh browser context; closed (kernel shut down) after the test."""
    opened: list[tuple[object, Notebook]] = []

    def open_(name: str) -> Notebook:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.add_init_script(MEDIA_PROBE)
        page = context.new_page()
        page.set_default_timeout(WAIT * 1000)
        notebook = Notebook(page, lab, name)
        opened.append((context, notebook))
        return notebook.open()

    yield open_
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for context, notebook in opened:
        if failed:
            try:
                notebook.screenshot(f"FAILED-{request.node.name}".replace("/", "_"))
            except Exception:  # the page may be gone; the log below still says what happened
                pass
        try:
            notebook.shutdown_kernel()
        except Exception:
            pass  # the session teardown shuts down whatever is left and kills leftover kernels by pid
        context.close()
    if failed:
        lab.save_log()
