"""A 2-process torchrun step (gloo, CPU) equals the 1-process step on the same global batch: loss and weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.training import train_cli

ARGS = ["--preset", "video-preview-tiny", "--toy-vision",
        "--override", "text.num_layers=2", "--override", "text.cross_attention_layers=[1]",
        "--steps", "1", "--batch-size", "4", "--lr", "3e-5", "--warmup-steps", "0",
        "--train-seeds", "1,2,3,4", "--clip-seconds", "3", "4", "--eval-clips", "0",
        "--log-every", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _first_step(run: Path) -> dict:
    return json.loads((run / "train_log.json").read_text())["history"][0]


# grouped: two steps whose 8 samples are sorted by length into batches, so each rank must take its slice of a
# reordered global batch
@pytest.mark.parametrize("extra", [[], ["--steps", "2", "--group-by-length", "2"]], ids=["index_order", "grouped"])
def test_two_process_step_equals_one_process_step(tmp_path, _restore_threads, extra):
    repo = Path(ml.__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two"
    # --standalone: a private rendezvous on a free local port
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mossvl_lab.training.trainer", *ARGS, *extra, "--out", str(two)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    log = json.loads((two / "train_log.json").read_text())
    assert log["world_size"] == 2

    one = tmp_path / "one"
    train_cli.main([*ARGS, *extra, "--out", str(one)])  # the same entry point, in this process: world size 1

    assert abs(_first_step(two)["loss"] - _first_step(one)["loss"]) < 1e-6
    assert _first_step(two)["tokens"] == _first_step(one)["tokens"]
    # AdamW's first step is blind to the gradient's scale, so compare that directly (norm before clipping)
    assert _first_step(two)["grad_norm"] == pytest.approx(_first_step(one)["grad_norm"], rel=1e-5)
    after_two = ml.load_model(two, progress=False).state_dict()
    after_one = ml.load_model(one, progress=False).state_dict()
    start = train_cli.build_from_args(train_cli.parse_args([*ARGS, *extra, "--out", str(one)]))[0].state_dict()
    moved = max(float((after_one[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-5, "the step must change the weights for the comparison to mean anything"
    for key, value in after_one.items():
        torch.testing.assert_close(after_two[key], value, rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
