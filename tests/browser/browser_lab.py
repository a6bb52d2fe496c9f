"""Helpers of the real-browser tests: the JupyterLab server (`Lab`), a notebook open in Chromium (`Notebook`),
the fake camera's Y4M clip and bounded waits. The fixtures that use them are in conftest.py.

Every wait is explicit and bounded (WAIT seconds unless said otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "ci-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
WAIT = 60.0  # seconds: the bound of every single wait
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Records every MediaStream the page's getUserMedia hands out, so a test can check that all tracks ended.
MEDIA_PROBE = """
(() => {
  const devices = navigator.mediaDevices;
  if (!devices || !devices.getUserMedia) return;
  const original = devices.getUserMedia.bind(devices);
  window.__mvStreams = [];
  devices.getUserMedia = async (constraints) => {
    const stream = await original(constraints);
    window.__mvStreams.push(stream);
    return stream;
  };
})();
"""

# JupyterLab helpers evaluated in the page: the notebook panel of a path, and its kernel.
PANEL_JS = """
const panelFor = (path) => {
  for (const widget of window.jupyterapp.shell.widgets('main')) {
    if (widget.context && widget.context.path === path && widget.content && widget.sessionContext) return widget;
  }
  return null;
};
"""


def wait_until(condition, what: str, timeout: float = WAIT, interval: float = 0.25):
    """Poll condition() until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- fake camera


def _rgb_to_yuv420(frame: np.ndarray) -> bytes:
    """Full-range BT.601 (JPEG) Y, then U and V subsampled 2x2: one Y4M C420jpeg frame."""
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128

    def sub(plane):
        h, w = plane.shape
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y, sub(u), sub(v)]
    return b"".join(np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in planes)


def write_y4m(path: Path, size: int = 64, fps: int = 10, frames: int = 20) -> Path:
    """A small YUV4MPEG2 clip: a red and a blue square moving over the synthetic clips' grey background."""
    header = f"YUV4MPEG2 W{size} H{size} F{fps}:1 Ip A1:1 C420jpeg\n".encode()
    chunks = [header]
    side = size // 4
    for k in range(frames):
        frame = np.full((size, size, 3), 96, np.uint8)
        x = (k * (size - side)) // max(frames - 1, 1)
        frame[8:8 + side, x:x + side] = (220, 40, 40)
        frame[size - 8 - side:size - 8, size - side - x:size - x] = (50, 80, 230)
        chunks += [b"FRAME\n", _rgb_to_yuv420(frame)]
    path.write_bytes(b"".join(chunks))
    return path


# ---------------------------------------------------------------------------------------------------- JupyterLab


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running anything
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    home: Path
    log: Path
    process: subprocess.Popen
    kernel_pids: set[int] = field(default_factory=set)

    @property
    def runtime_dir(self) -> Path:
        return self.home / "runtime"

    def api(self, path: str, method: str = "GET", timeout: float = 10.0):
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def save_log(self) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        target = ARTIFACTS / "jupyterlab.log"
        shutil.copyfile(self.log, target)
        return target


def _isolated_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var, sub in (("HOME", ""), ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "matplotlib"),
                     ("TMPDIR", "tmp")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    for var in ("JUPYTER_PATH", "MOSSVL_CHECKPOINT", "MOSSVL_VIDEO", "JUPYTER_TOKEN"):
        env.pop(var, None)
    env["OMP_NUM_THREADS"] = "1"  # kernels inherit the server's environment
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def _user_settings(directory: Path) -> None:
    """Every cell attached to the DOM (no windowing), and no news / update checks."""
    settings = {"notebook-extension/tracker": {"windowingMode": "none", "kernelShutdown": False},
                "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
    for name, values in settings.items():
        path = directory / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _stop(lab: Lab) -> None:
    try:  # shut the kernels down through the server first: they run in their own process sessions
        for kernel in lab.api("kernels"):
            try:
                lab.api(f"kernels/{kernel['id']}", method="DELETE", timeout=30)
            except (urllib.error.URLError, OSError):
                pass
    except (urllib.error.URLError, OSError, ValueError):
        pass
    process = lab.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in lab.kernel_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in lab.kernel_pids:  # only kernels this session started (their pids were read from them)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- notebooks


class KernelError(AssertionError):
    pass


class Notebook:
    """One notebook open in JupyterLab: run all cells, run code in its kernel, find its widgets."""

    def __init__(self, page, lab: Lab, name: str) -> None:
        self.page, self.lab, self.name = page, lab, name
        self.kernel_pid: int | None = None
        self.kernel_id: str | None = None

    def _eval(self, body: str, arg=None):
        """Evaluate `async (arg) => { <PANEL_JS> <body> }` in the page."""
        return self.page.evaluate(f"async (arg) => {{ {PANEL_JS} {body} }}", arg)

    def open(self) -> "Notebook":
        self.page.goto(self.lab.notebook_url(self.name), wait_until="domcontentloaded", timeout=WAIT * 1000)
        self.page.wait_for_function("() => window.jupyterapp !== undefined", timeout=WAIT * 1000)
        state = """
          const panel = panelFor(arg);
          if (!panel) return null;
          const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
          if (!kernel || kernel.connectionStatus !== 'connected' || kernel.status !== 'idle') return null;
          return kernel.id;
        """
        self.kernel_id = wait_until(lambda: self._eval(state, self.name), f"{self.name}'s kernel to be ready")
        self.kernel_pid = int(self.run("import os; print(os.getpid())"))
        self.lab.kernel_pids.add(self.kernel_pid)
        return self

    def run_all(self, timeout: float = 2 * WAIT) -> None:
        """Run every cell (JupyterLab's own command) and wait until all ran; fail on the first error output."""
        self._eval("""
          const panel = panelFor(arg);
          window.jupyterapp.shell.activateById(panel.id);
          await window.jupyterapp.commands.execute('notebook:run-all-cells');
        """, self.name)
        progress = """
          const panel = panelFor(arg);
          const cells = panel.content.widgets.filter((cell) => cell.model.type === 'code');
          const errors = [], stderr = [];
          for (const cell of cells) {
            for (const output of cell.model.outputs.toJSON()) {
              if (output.output_type === 'error') errors.push(`${output.ename}: ${output.evalue}`);
              if (output.output_type === 'stream' && output.name === 'stderr') stderr.push(String(output.text));
            }
          }
          const kernel = panel.sessionContext.session.kernel;
          return {cells: cells.length, pending: cells.filter((cell) => cell.model.executionCount === null).length,
                  errors, stderr: stderr.join(''), status: kernel.status};
        """

        def done():
            state = self._eval(progress, self.name)
            if state["errors"]:
                raise AssertionError(f"{self.name}: error cell(s) after Run All: {state['errors']}")
            return state if state["pending"] == 0 and state["status"] == "idle" else None

        state = wait_until(done, f"Run All of {self.name} to finish", timeout=timeout)
        assert "Traceback" not in state["stderr"], state["stderr"]

    def run(self, code: str, timeout: float = WAIT) -> str:
        """Execute `code` in the notebook's kernel (not in a cell) and return its stdout."""
        result = self._eval("""
          const panel = panelFor(arg.path);
          const kernel = panel.sessionContext.session.kernel;
          const future = kernel.requestExecute({code: arg.code, silent: false, store_history: false,
                                                allow_stdin: false, stop_on_error: false});
          let out = '';
          const errors = [];
          future.onIOPub = (msg) => {
            const kind = msg.header.msg_type;
            if (kind === 'stream' && msg.content.name === 'stdout') out += msg.content.text;
            if (kind === 'error') errors.push(`${msg.content.ename}: ${msg.content.evalue}`);
          };
          const timer = new Promise((_, reject) => setTimeout(() => reject(new Error('kernel timeout')), arg.ms));
          await Promise.race([future.done, timer]);
          return {out, errors};
        """, {"path": self.name, "code": code, "ms": int(timeout * 1000)})
        if result["errors"]:
            raise KernelError(f"kernel code failed: {result['errors']}\n{code}")
        return result["out"].strip()

    def value(self, expression: str):
        """A JSON-able Python expression evaluated in the kernel."""
        return json.loads(self.run(f"import json as _mv_json; print(_mv_json.dumps({expression}))"))

    def cell(self, marker: str):
        """The one code cell whose source contains `marker`."""
        inputs = self.page.locator(".jp-InputArea-editor", has_text=marker)
        cell = self.page.locator(".jp-Notebook .jp-CodeCell").filter(has=inputs)
        wait_until(lambda: cell.count() == 1, f"exactly one cell containing {marker!r} (found {cell.count()})")
        return cell

    def screenshot(self, name: str, target=None) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if target is not None:
            target.scroll_into_view_if_needed(timeout=WAIT * 1000)
            self.page.wait_for_timeout(300)  # let the scroll settle before the picture
        self.page.screenshot(path=str(path))
        return path

    def shutdown_kernel(self) -> None:
        """Shut the kernel down through JupyterLab and wait until its process is gone."""
        closed = self._eval("const panel = panelFor(arg); if (!panel) return true; "
                            "await panel.sessionContext.shutdown(); return false;", self.name)
        if closed and self.kernel_id is not None:  # its notebook was closed: ask the server
            try:
                self.lab.api(f"kernels/{self.kernel_id}", method="DELETE", timeout=WAIT)
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: already shut down
                    raise
        if self.kernel_pid is not None:
            wait_until(lambda: not _alive(self.kernel_pid), f"kernel process {self.kernel_pid} to exit")
