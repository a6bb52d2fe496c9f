"""The benchmark scripts behind README's performance numbers still run end to end (at toy sizes: these check that
each script works and reports consistent numbers, not how fast anything is)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_streaming_benchmark_reports_every_frame_count_and_the_gqa_cache_size():
    out = _run("streaming.py", "--frames", "2", "3", "--repeats", "1", "--hf-repeats", "1", "--decode-tokens", "2")
    number = r"\s+([\d.]+)"
    row = rf"^\s+(\d+) \|{number} ms \|{number} ms \|{number}x \|{number} \|{number} \|{number}$"
    rows = re.findall(row, out, flags=re.MULTILINE)
    assert [int(r[0]) for r in rows] == [2, 3], out
    for _, ours, theirs, speedup, rate, their_rate, ratio in rows:
        # the printed speed-up and ratio are the quotients of the printed columns (up to their rounding)
        assert float(speedup) == pytest.approx(float(theirs) / float(ours), rel=0.05, abs=0.06)
        assert float(ratio) == pytest.approx(float(rate) / float(their_rate), rel=0.05, abs=0.02)
    assert "equal: True" in out, out


@pytest.mark.slow
def test_hooks_overhead_benchmark_counts_the_hook_points_it_strips():
    out = _run("hooks_overhead.py", "--preset", "video-preview-tiny", "--rounds", "2", "--frames", "1", "--text", "8")
    import mossvl_lab as ml

    model = ml.build_model(ml.config.preset("video-preview-tiny"))
    assert f"{len(model.hook_names())} hook points" in out, out
    assert re.search(r"prefill forward\s+instrumented\s+[\d.]+ ms\s+bare\s+[\d.]+ ms\s+ratio [\d.]+", out), out


@pytest.mark.slow
def test_stop_latency_benchmark_prints_the_ratio_of_its_two_medians():
    out = _run("stop_latency.py", "--objects", "1000", "--rounds", "1")
    found = re.search(r"ours ([\d.]+) s \| always collecting ([\d.]+) s \| ratio ([\d.]+)x", out)
    assert found, out
    ours, always, ratio = map(float, found.groups())
    assert ratio == pytest.approx(always / ours, rel=0.1)  # printed times are rounded to 0.1 ms


@pytest.mark.slow
def test_train_step_benchmark_prints_both_families_and_the_ratio_of_their_medians():
    out = _run("train_step.py", "--rounds", "1", "--batch-size", "2", "--threads", "1")
    rows = re.findall(r"^([\w-]+): batch 2 \| tower frames (\d+) -> (\d+) distinct \| distinct frames ([\d.]+) s/step "
                      r"\| every frame ([\d.]+) s/step \| ratio ([\d.]+)x$", out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["video-preview-tiny", "moss-vl-tiny"], out
    for _, every_frame, distinct, ours, every, ratio in rows:
        assert 0 < int(distinct) < int(every_frame)
        assert float(ratio) == pytest.approx(float(every) / float(ours), rel=0.05, abs=0.02)


@pytest.mark.slow
def test_length_grouping_benchmark_pads_less_grouped_and_prints_the_ratio_of_its_medians():
    out = _run("length_grouping.py", "--steps", "2", "--rounds", "1", "--batch-size", "2", "--threads", "1")
    rows = re.findall(r"^([\w-]+): padding ([\d.]+)% -> ([\d.]+)%; s/step index order ([\d.]+), grouped ([\d.]+); "
                      r"([\d.]+)x$", out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["video-preview-tiny", "moss-vl-tiny"], out
    for _, plain_pad, grouped_pad, plain, grouped, ratio in rows:
        assert float(grouped_pad) <= float(plain_pad)  # sorted runs never pad more than index order
        assert float(ratio) == pytest.approx(float(plain) / float(grouped), rel=0.05, abs=0.01)
