"""The widgets in a real JupyterLab in Chromium: the notebooks run with Run All, then the tests click the widgets
and check what the kernel received. Screenshots go to ci-artifacts/screenshots/<widget>.png.

Each test opens its notebook in a fresh browser context and workspace; kernel state is read by executing code in
the notebook's own kernel (not through a cell), after the clicks' messages (they go first on the same channel).
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from browser_lab import WAIT, _alive, wait_until
from mossvl_lab.widgets.live_stream import THREAD_PREFIX

pytestmark = pytest.mark.browser

MS = WAIT * 1000
KERNEL_THREADS = ("subshell-",)  # ipykernel starts these itself when JupyterLab asks for a subshell


def _bars(attribute: str | None) -> list[float]:
    return [float(v) for v in attribute.split(",")] if attribute else []


# ---------------------------------------------------------------------------------------------- StreamStepper


def test_stream_stepper_buttons_step_the_kernel_session(open_notebook):
    nb = open_notebook("02_stepping.ipynb")
    nb.run_all()
    cell = nb.cell("stepper = StreamStepper(")
    widget = cell.locator(".mv-stepper")
    host = widget.locator("xpath=..")  # anywidget's element: carries data-running
    expect(widget).to_be_visible(timeout=MS)
    before = nb.value("{'pushed': stepper.frames_pushed, 'steps': stepper.step_count, "
                      "'stamps': list(stepper.clip.timestamps), 'shown': stepper.step}")
    assert before["pushed"] > 0 and before["shown"] == before["steps"]  # the notebook left the view following
    timestamp = widget.get_by_test_id("timestamp")
    k = before["pushed"] - 1
    expect(timestamp).to_have_text(f"t = {before['stamps'][k]:.1f} s (frame {k})", timeout=MS)

    for k in (before["pushed"], before["pushed"] + 1):
        widget.get_by_test_id("step-frame").click()
        expect(timestamp).to_have_text(f"t = {before['stamps'][k]:.1f} s (frame {k})", timeout=MS)
    after = nb.value("{'pushed': stepper.frames_pushed, 'steps': stepper.step_count, 'ts': stepper.timestamp, "
                     "'error': stepper.error}")
    assert after["pushed"] == before["pushed"] + 2 and after["error"] == ""
    assert after["steps"] >= before["steps"] + 2  # at least one decision per stepped frame
    assert after["ts"] == before["stamps"][before["pushed"] + 1]
    expect(widget.get_by_test_id("step-count")).to_have_text(f"step {after['steps']} / {after['steps']}", timeout=MS)
    expect(widget.get_by_test_id("timestamp")).to_have_attribute("data-seconds", f"{after['ts']:.3f}")
    src = widget.get_by_test_id("frame").get_attribute("src")
    assert src and src.startswith("blob:")

    # Run, then Pause: each step sleeps a little in the kernel so the run cannot finish before Pause arrives
    nb.run("import time as _mv_time\n_mv_slow = lambda session, events: _mv_time.sleep(0.05)\n"
           "stepper.add_listener(_mv_slow)")
    try:
        widget.get_by_test_id("run").click()
        expect(host).to_have_attribute("data-running", "true", timeout=MS)
        expect(timestamp).not_to_have_text(f"t = {after['ts']:.1f} s (frame {after['pushed'] - 1})", timeout=MS)
        widget.get_by_test_id("pause").click()
        expect(host).to_have_attribute("data-running", "false", timeout=MS)
        paused = nb.value("{'running': stepper.running, 'pushed': stepper.frames_pushed, 'left': stepper.frames_left,"
                          " 'error': stepper.error}")
        assert not paused["running"] and paused["error"] == ""
        assert paused["pushed"] > after["pushed"] and paused["left"] > 0, paused  # it ran, and stopped early
        time.sleep(1.0)
        assert nb.value("stepper.frames_pushed") == paused["pushed"]  # nothing steps while paused
        expect(widget.get_by_test_id("step-frame")).to_be_enabled()
    finally:
        nb.run("stepper.remove_listener(_mv_slow)")
    nb.screenshot("stream_stepper", widget)


# ---------------------------------------------------------------------------------------------- FrameAttentionView


def test_frame_attention_view_follows_the_clicked_token(open_notebook):
    nb = open_notebook("03_attention.ipynb")
    nb.run_all()
    cell = nb.cell("view = FrameAttentionView(")
    widget = cell.locator(".mv-attention")
    expect(widget).to_be_visible(timeout=MS)
    bars = widget.get_by_test_id("frame-bars")
    state = nb.value("{'token': view.token, 'listed': [t['i'] for t in view.tokens], 'bars': view.bars}")
    expect(bars).to_have_attribute("data-token", str(state["token"]), timeout=MS)
    shown = _bars(bars.get_attribute("data-bars"))
    assert shown == pytest.approx(state["bars"], abs=1e-4)

    # a token whose plot differs from the one shown (which tokens those are depends on the trained weights)
    differing = nb.value("[t['i'] for t in view.tokens if t['i'] != view.token and max(abs(a - b) for a, b in "
                         "zip(view.data.frame_mass(t['i'], view.layer, view.head).tolist(), view.bars)) > 1e-3]")
    assert differing, "every token attends like the selected one"
    target = differing[0]
    widget.get_by_test_id(f"token-{target}").click()
    expect(bars).to_have_attribute("data-token", str(target), timeout=MS)
    clicked = _bars(bars.get_attribute("data-bars"))
    assert clicked != shown
    kernel = nb.value("{'token': view.token, 'bars': view.bars, 'mass': view.mass().tolist()}")
    assert kernel["token"] == target
    assert clicked == pytest.approx(kernel["bars"], abs=1e-4) and kernel["bars"] == pytest.approx(kernel["mass"])
    expect(widget.get_by_test_id(f"token-{target}")).to_have_class(re.compile(r"\bmv-selected\b"), timeout=MS)

    # one head of one layer: the select goes to the kernel, the bars come back from it
    widget.get_by_test_id("head-select").select_option("0")
    wait_until(lambda: nb.value("view.head") == 0, "the kernel to receive head 0")
    head0 = nb.value("view.data.frame_mass(view.token, view.layer, 0).tolist()")
    wait_until(lambda: _bars(bars.get_attribute("data-bars")) == pytest.approx(head0, abs=1e-4),
               "the bars of head 0")
    # a thumbnail picks the heatmap's frame
    widget.get_by_test_id("thumb-0").click()
    wait_until(lambda: nb.value("view.frame") == 0, "the kernel to receive frame 0")
    expect(widget.get_by_test_id("heatmap")).to_have_attribute("data-frame", "0", timeout=MS)
    nb.screenshot("frame_attention", widget)


# ---------------------------------------------------------------------------------------------- KVCacheInspector


def test_kv_cache_inspector_shows_the_kernels_caches(open_notebook):
    nb = open_notebook("04_kv_cache.ipynb")
    nb.run_all()
    widget = nb.cell("bounded_inspector = KVCacheInspector(").locator(".mv-kvcache")
    expect(widget).to_be_visible(timeout=MS)
    kernel = nb.value("{'segments': len(bounded_inspector.segments), 'layers': len(bounded_inspector.layers), "
                      "'step': bounded_inspector.step, 'frames': bounded_inspector.totals['vision_frames'], "
                      "'evicted': bounded_inspector.totals['frames_evicted']}")
    assert kernel["frames"] == 8 and kernel["evicted"] > 0  # the window policy acted
    expect(widget.get_by_test_id("segments")).to_have_attribute("data-rows", str(kernel["segments"]), timeout=MS)
    expect(widget.get_by_test_id("layers")).to_have_attribute("data-rows", str(kernel["layers"]), timeout=MS)
    expect(widget.get_by_test_id("total-step")).to_have_text(str(kernel["step"]), timeout=MS)
    expect(widget.get_by_test_id("total-frames_evicted")).to_have_text(str(kernel["evicted"]), timeout=MS)
    widget.get_by_test_id("refresh").click()  # a refresh message re-reads the same caches
    expect(widget.get_by_test_id("total-step")).to_have_text(str(kernel["step"]), timeout=MS)
    nb.screenshot("kv_cache", widget)


# ---------------------------------------------------------------------------------------------- LiveStream


THREADS = "sorted(t.name for t in __import__('threading').enumerate())"  # a kernel-side expression
WORKERS = f"[name for name in {THREADS} if name.startswith({THREAD_PREFIX!r})]"


def _worker_threads(nb) -> list[str]:
    return nb.value(WORKERS)


def _tracks_live(nb) -> int:
    return nb.page.evaluate("() => (window.__mvStreams || []).flatMap((s) => s.getTracks())"
                            ".filter((t) => t.readyState === 'live').length")


def _start_live(nb):
    """Run the webcam notebook, click Start on its LiveStream and wait until camera frames reach the model."""
    nb.run_all()
    widget = nb.cell("live = LiveStream(").locator(".mv-webcam")
    host = widget.locator("xpath=..")
    expect(widget).to_be_visible(timeout=MS)
    assert nb.value("live.running") is False and _worker_threads(nb) == []  # Run All started no camera
    widget.get_by_test_id("start").click()
    expect(host).to_have_attribute("data-camera", "on", timeout=MS)
    wait_until(lambda: nb.value("live.frames_ingested") >= 3, "three camera frames to reach the session")
    return widget, host


def test_live_stream_takes_the_camera_and_stop_releases_it(open_notebook):
    nb = open_notebook("06_webcam.ipynb")
    widget, host = _start_live(nb)
    first = nb.value("{'received': live.frames_received, 'steps': live.steps, 'transcript': live.transcript, "
                     "'error': live.error, 'camera_error': live.camera_error, 'ts': live.last_timestamp}")
    assert first["error"] == "" and first["camera_error"] == "" and first["ts"] > 0
    assert _tracks_live(nb) == 1

    def grown():
        # all three must move: the transcript can grow from a frame that was already queued at `first`, before
        # the (throttled, on a busy machine) camera sends its next one
        now = nb.value("{'steps': live.steps, 'transcript': live.transcript, 'received': live.frames_received}")
        return now if (now["steps"] > first["steps"] and now["transcript"] != first["transcript"]
                       and now["received"] > first["received"]) else None

    wait_until(grown, "more camera frames to arrive and the transcript to grow")
    assert int(widget.get_by_test_id("frames-received").inner_text()) >= first["received"]
    expect(widget.get_by_test_id("transcript")).not_to_be_empty(timeout=MS)
    inspector = nb.value("inspector.totals['vision_frames']")
    assert inspector >= 3  # the KVCacheInspector below follows the live session
    nb.screenshot("live_stream", widget)

    widget.get_by_test_id("stop").click()
    expect(host).to_have_attribute("data-camera", "off", timeout=MS)
    expect(host).to_have_attribute("data-running", "false", timeout=MS)
    wait_until(lambda: _tracks_live(nb) == 0, "the camera tracks to end")
    stopped = nb.value("{'running': live.running, 'closed': live.session.closed, "
                       "'alive': live.worker.is_alive()}")
    assert stopped == {"running": False, "closed": True, "alive": False}
    assert _worker_threads(nb) == []
    received = nb.value("live.frames_received")
    time.sleep(1.5)
    assert nb.value("live.frames_received") == received  # no frame arrives after Stop


def test_closing_the_notebook_and_shutting_down_leave_no_thread_and_no_process(open_notebook, lab):
    nb = open_notebook("06_webcam.ipynb")
    baseline = set(nb.value(THREADS))
    assert not [t for t in baseline if t.startswith(THREAD_PREFIX)]
    _start_live(nb)
    assert len(_worker_threads(nb)) == 1
    # close the notebook's tab while the camera runs; the kernel keeps running (JupyterLab's default)
    nb._eval("const panel = panelFor(arg); await panel.context.save(); panel.close();", nb.name)
    wait_until(lambda: nb._eval("return panelFor(arg) === null;", nb.name), "the notebook to close")
    wait_until(lambda: _tracks_live(nb) == 0, "the closed view to release the camera")
    assert lab.api(f"kernels/{nb.kernel_id}")["id"] == nb.kernel_id

    # the kernel, asked directly (its notebook is closed): the stream still runs until it is closed
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient(connection_file=str(lab.runtime_dir / f"kernel-{nb.kernel_id}.json"))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=WAIT)

        def ask(code: str) -> str:
            out: list[str] = []

            def hook(msg):
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    out.append(msg["content"]["text"])
                if msg["msg_type"] == "error":
                    raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}")

            client.execute_interactive(code, timeout=WAIT, output_hook=hook, store_history=False)
            return "".join(out).strip()

        received = int(ask("print(live.frames_received)"))
        time.sleep(1.5)
        assert int(ask("print(live.frames_received)")) == received  # no view, no camera: no frames
        assert ask(f"print(live.running, len({WORKERS}))") == "True 1"
        assert ask("live.close(); print(live.running, live.worker.is_alive())") == "False False"
        left = set(ask(f"print('\\n'.join({THREADS}))").splitlines())
        assert not [t for t in left if t.startswith(THREAD_PREFIX)]
        added = {t for t in left - baseline if not t.startswith(KERNEL_THREADS)}
        assert not added, f"threads the stream left behind: {added}"
    finally:
        client.stop_channels()

    lab.api(f"sessions/{next(s['id'] for s in lab.api('sessions') if s['kernel']['id'] == nb.kernel_id)}",
            method="DELETE", timeout=WAIT)
    wait_until(lambda: not _alive(nb.kernel_pid), f"kernel process {nb.kernel_pid} to exit")
    assert nb.kernel_id not in [k["id"] for k in lab.api("kernels")]
