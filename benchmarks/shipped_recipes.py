"""What the training benchmarks share: the shipped tiny checkpoints, their recipes' synthetic samples, and one timed
training step (forward, weighted loss, backward, AdamW)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import mossvl_lab as ml
from mossvl_lab.training import trainer
from mossvl_lab.training.batching import collate, weighted_lm_loss
from mossvl_lab.training.streams import TrainingSample

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RECIPES = {"video-preview-tiny": {}, "moss-vl-tiny": {"offline_qa_fraction": 0.3, "offline_qa_turns": 4}}


def load_with_samples(name: str, batch_size: int, count: int) -> tuple[torch.nn.Module, list[TrainingSample]]:
    """The shipped checkpoint `name` in train mode and the first `count` training samples of its recipe."""
    model = ml.load_model(CHECKPOINTS / name, progress=False).train()
    processor = ml.load_processor(CHECKPOINTS / name)
    cfg = trainer.TrainConfig(event_rate=0.4, batch_size=batch_size, **RECIPES[name])
    size = trainer.default_frame_size(processor)
    return model, [trainer.make_sample(i, cfg, processor, model.config, size) for i in range(count)]


def model_inputs(model: torch.nn.Module, samples: list[TrainingSample]) -> tuple[dict, torch.Tensor]:
    """samples -> (the model's keyword inputs, labels [batch, pos])."""
    batch = collate(samples, model.config.family, model.config.tokens.pad_token_id)
    labels = batch.pop("labels")
    batch.pop("decisions"), batch.pop("replies")
    return batch, labels


def step_seconds(model, optimizer, batch: dict, labels: torch.Tensor, dedup: bool = True) -> float:
    """Seconds of one training step on a collated batch."""
    started = time.perf_counter()
    logits = model(**batch, dedup_frames=dedup).logits
    loss_sum, count = weighted_lm_loss(logits, labels, model.config.tokens.silence_token_id)
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / count).backward()
    optimizer.step()
    return time.perf_counter() - started
