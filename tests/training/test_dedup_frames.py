"""Encoding each distinct frame once (`dedup_frames=True`, what the trainer does) is the same function with the
same gradients as encoding every frame, and the tower really sees fewer frames."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.frames import distinct_rows
from mossvl_lab.training import trainer
from mossvl_lab.training.batching import collate, weighted_lm_loss

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def test_distinct_rows_numbers_rows_by_first_occurrence():
    rows = torch.tensor([[5.0, 1.0], [0.0, 2.0], [5.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    first, inverse = distinct_rows(rows)
    assert first.tolist() == [0, 1, 3]          # worked out by hand: rows 2 and 4 repeat rows 0 and 1
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(rows[first][inverse], rows)


def _frames_seen(model) -> list[int]:
    """Frames the tower is called on, per call (Mllama: [batch, frame, ...] inputs; MOSS-VL: one grid_thw row each)."""
    seen: list[int] = []

    def count(_module, args, kwargs):
        pixels = args[0]
        seen.append(int(args[1].shape[0]) if pixels.dim() == 2 else int(pixels.shape[0] * pixels.shape[1]))
    model.vision.register_forward_pre_hook(count, with_kwargs=True)
    return seen


@pytest.mark.parametrize("name, recipe", [("video-preview-tiny", {}),
                                          ("moss-vl-tiny", {"offline_qa_fraction": 0.5, "offline_qa_turns": 2})])
def test_dedup_frames_gives_the_same_logits_and_gradients_from_fewer_tower_frames(name, recipe):
    torch.manual_seed(0)
    model = ml.load_model(CHECKPOINTS / name, progress=False).train()
    processor = ml.load_processor(CHECKPOINTS / name)
    cfg = trainer.TrainConfig(event_rate=0.4, **recipe)
    samples = [trainer.make_sample(i, cfg, processor, model.config, trainer.default_frame_size(processor))
               for i in range(4)]
    batch = collate(samples, model.config.family, model.config.tokens.pad_token_id)
    labels = batch.pop("labels")
    batch.pop("decisions"), batch.pop("replies")
    seen = _frames_seen(model)
    results = {}
    for dedup in (False, True):
        seen.clear()
        model.zero_grad(set_to_none=True)
        logits = model(**batch, dedup_frames=dedup).logits
        loss_sum, count = weighted_lm_loss(logits, labels, model.config.tokens.silence_token_id)
        (loss_sum / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[dedup] = (logits.detach(), grads, sum(seen))
    (every_logits, every_grads, every_frames), (ours_logits, ours_grads, ours_frames) = results[False], results[True]
    torch.testing.assert_close(ours_logits, every_logits, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == every_grads.keys() and any(n.startswith("vision.") for n in ours_grads)
    for n, g in every_grads.items():  # summation order differs (a shared frame's gradient is summed over copies)
        assert float((ours_grads[n] - g).abs().max()) <= 1e-4 * float(g.abs().max()), n
    assert ours_frames < every_frames  # static scenes (events at 0.4/s) and batch padding repeat frames
