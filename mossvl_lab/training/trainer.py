"""Train any config on the synthetic streaming clips: AdamW, warmup + cosine, silence-weighted loss, periodic eval.

    python -m mossvl_lab.training.trainer --preset video-preview-tiny --steps 200 --out runs/vp
    torchrun --nproc_per_node 2 -m mossvl_lab.training.trainer --preset video-preview-tiny --steps 200 --out runs/vp

Global sample i of the run is clip seed `(seed * 7919 + i * 104729) mod 1_000_000` (a bijection on the training
seeds, all below the held-out EVAL_SEEDS), or `train_seeds[i mod n]` when fixed seeds are given, so the
global batch of a step does not depend on the number of processes. Under torchrun each rank takes its
contiguous slice of the global batch; the loss is the weighted sum over the GLOBAL number of target tokens, so
the gradients (after DDP's averaging, undone by a factor world_size) equal the one-process run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import EVAL_SEEDS, EVENT_KINDS, QUESTION_STYLES, SHAPES, make_clip
from ..processing.templates import family_style
from . import distributed
from .batching import collate, go_on_decisions, weighted_lm_loss
from .evaluate import default_frame_size, evaluate
from .grouping import StepSamples
from .metrics import Metrics
from .streams import TrainingSample, offline_qa_sample, realtime_sample

logger = logging.getLogger(__name__)

TRAIN_SEED_LIMIT = 1_000_000  # EVAL_SEEDS start here


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8                      # global: split evenly over the processes
    lr: float = 2e-3
    weight_decay: float = 0.01               # on matrices only (not norms, gates, biases)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1                # the cosine ends at lr * min_lr_ratio
    silence_weight: float = 1.0              # loss weight of <|silence|> targets (spec video-preview §5.6)
    decision_weight: float = 1.0             # loss weight of the targets that decide to speak or to go on
    decision_kinds: str = "all"              # which decisions decision_weight weighs: all | go_on (after speech)
    # loss weight of the reply parts ("[, ]the square is red"). Above 1 it makes replies likelier after every
    # caption, trading missed revisions for false ones; it does not teach which shape was asked (issue 7, s7)
    reply_weight: float = 1.0
    eval_every: int = 0                      # steps between evaluations; 0 = only at the end
    eval_clips: int = 20                     # held-out clips per evaluation; 0 = no evaluation
    seed: int = 0
    grad_clip: float | None = 1.0
    clip_seconds: tuple[int, int] = (8, 20)  # clip length range, training and evaluation
    # chance of a scene event per second in TRAINING clips (evaluation keeps make_clip's 0.25): denser events give
    # more caption targets per frame of compute, and silence is still decided by whether the frame changed
    event_rate: float = 0.25
    # relative odds of event kinds in TRAINING clips, e.g. (("move", 3.0),); () = uniform, as in evaluation
    event_kind_weights: tuple[tuple[str, float], ...] = ()
    extra_questions: int = 0                 # more mid-stream questions per TRAINING clip (evaluation asks one)
    # each training clip twice (samples 2k and 2k + 1), the second time asking about another shape at the same
    # frame: the two streams differ only where the answer depends on which shape was asked, so their losses teach
    # that link
    question_pairs: bool = False
    question_style: str = "plain"            # synthetic.QUESTION_STYLES; evaluation expects the trained style
    frame_size: int | None = None            # rendered frame side; None = what the processor feeds the tower
    offline_qa_fraction: float = 0.0         # MOSS-VL: share of offline timestamp-QA samples
    # questions per offline sample, all of one kind (mixing kinds would let a "when" answer be copied from an
    # earlier "what happened at" turn); evaluation asks one at a time
    offline_qa_turns: int = 1
    offline_question_first: bool = False     # ask the first offline question before the video (streams.offline_prompt)
    out_dir: str | None = None               # checkpoint + processor + train_log.json (None = nothing saved)
    log_every: int = 10
    train_seeds: tuple[int, ...] = ()        # fixed clip seeds to cycle through (overfitting, tests)
    max_tokens_per_turn: int = 64            # evaluation: per-turn token cap
    # steps per window whose samples are sorted by length into batches (grouping.StepSamples); 0 = index order
    group_by_length: int = 0

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "warmup_steps": 0 <= self.warmup_steps, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
                  "silence_weight": self.silence_weight >= 0, "decision_weight": self.decision_weight >= 0,
                  "reply_weight": self.reply_weight >= 0,
                  "decision_kinds": self.decision_kinds in ("all", "go_on"),
                  "eval_every": self.eval_every >= 0, "group_by_length": self.group_by_length >= 0,
                  "eval_clips": 0 <= self.eval_clips <= len(EVAL_SEEDS), "log_every": self.log_every >= 1,
                  "clip_seconds": 1 <= self.clip_seconds[0] <= self.clip_seconds[1],
                  "offline_qa_fraction": 0 <= self.offline_qa_fraction <= 1,
                  "offline_qa_turns": self.offline_qa_turns >= 1,
                  "event_rate": 0 <= self.event_rate <= 1,
                  "event_kind_weights": all(k in EVENT_KINDS and w >= 0 for k, w in self.event_kind_weights),
                  "extra_questions": 0 <= self.extra_questions < len(SHAPES),
                  "question_style": self.question_style in QUESTION_STYLES,
                  "train_seeds": all(0 <= s < TRAIN_SEED_LIMIT for s in self.train_seeds)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig: invalid {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.question_pairs and self.extra_questions:
            raise ValueError("TrainConfig: question_pairs swaps a clip's one question for another shape; "
                             "use it with extra_questions=0")


@dataclass
class TrainResult:
    history: list[dict[str, float]]          # one row per step: step, loss, lr, grad_norm, tokens
    final_metrics: Metrics | None            # the last evaluation (None when eval_clips == 0)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", **metrics} per evaluation
    out_dir: Path | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0                 # this process's CPU time: wall time inflates when others share the CPU


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based `step`: linear warmup to cfg.lr, then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def clip_seed(index: int, cfg: TrainConfig) -> int:
    if cfg.train_seeds:
        return cfg.train_seeds[index % len(cfg.train_seeds)]
    return (cfg.seed * 7_919 + index * 104_729) % TRAIN_SEED_LIMIT


def make_sample(index: int, cfg: TrainConfig, processor: Any, model_cfg: Any, frame_size: int) -> TrainingSample:
    """Global sample `index` of the run: a realtime stream, or (MOSS-VL, with probability offline_qa_fraction)
    offline timestamp questions about the clip (up to offline_qa_turns, of the kind of the first). With
    question_pairs an odd index is the realtime stream of the clip before it, its question about another shape."""
    paired = cfg.question_pairs and index % 2 == 1
    clip = make_clip(clip_seed(index - 1 if paired else index, cfg), size=frame_size,
                     min_seconds=cfg.clip_seconds[0], max_seconds=cfg.clip_seconds[1], event_rate=cfg.event_rate,
                     kind_weights=dict(cfg.event_kind_weights) or None, extra_questions=cfg.extra_questions,
                     question_style=cfg.question_style)
    rng = np.random.default_rng([cfg.seed, index])
    if paired and clip.question is not None:
        other = str(rng.choice([shape for shape in SHAPES if shape != clip.question.shape]))
        return realtime_sample(dataclasses.replace(clip, question=dataclasses.replace(clip.question, shape=other)),
                               processor, model_cfg)
    if cfg.offline_qa_fraction and clip.qa and family_style(model_cfg.family) == "chatml" \
            and rng.random() < cfg.offline_qa_fraction:
        pair = clip.qa[int(rng.integers(len(clip.qa)))]
        more = [(p.question, p.answer) for p in clip.qa if p.kind == pair.kind and p is not pair]
        return offline_qa_sample(clip, pair.question, pair.answer, processor,
                                 follow_ups=more[:cfg.offline_qa_turns - 1], question_first=cfg.offline_question_first)
    return realtime_sample(clip, processor, model_cfg)


def open_gates(model: Any, value: float) -> int:
    """Set every learned cross-attention gate (gate kind "tanh_scalar") to `value`; returns how many were set.

    The zero init of the gates (Flamingo, Mllama) keeps a pretrained language model intact; a model trained from
    scratch gets almost no gradient into its cross-attention weights through closed gates, so its vision path
    barely learns (a tiny preset stays silent on every frame after 250 steps with closed gates; with 0.5 it
    starts to detect events within 150)."""
    count = 0
    with torch.no_grad():
        for block in model.blocks:
            if getattr(block, "gated", False):
                block.cross_attn_attn_gate.fill_(value)
                block.cross_attn_mlp_gate.fill_(value)
                count += 2
    return count


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def train(model: Any, processor: Any, cfg: TrainConfig, *, progress: bool = True,
          run_info: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place. Under torchrun (its env set) data parallel over the process group; rank 0 alone
    shows the progress bar, evaluates and saves. run_info (e.g. the command line and machine) is written into
    train_log.json as it is, for the model card. A model built from scratch learns its vision path far faster
    with open cross-attention gates: call `open_gates(model, 0.5)` first (the CLI does)."""
    info = distributed.init_distributed(next(model.parameters()).device.type)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} does not split over {info.world_size} processes")
    device = info.device if info.enabled else next(model.parameters()).device
    model.to(device).train()
    model_cfg = model.config
    frame_size = cfg.frame_size or default_frame_size(processor)
    runner = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=False)
    optimizer = _optimizer(model, cfg)
    step_samples = StepSamples(lambda i: make_sample(i, cfg, processor, model_cfg, frame_size),
                               batch_size=cfg.batch_size, steps=cfg.steps, window=cfg.group_by_length, seed=cfg.seed,
                               rank=info.rank, world_size=info.world_size)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    final: Metrics | None = None
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="train")
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        for step in range(cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, tokens = _step(runner, model, optimizer, step_samples(step), cfg, info, device)
            history.append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens})
            if bar is not None:
                bar.update(1)
                if (step + 1) % cfg.log_every == 0 or step == 0:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if info.is_main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                logger.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f", step + 1, cfg.steps, loss, lr, grad_norm)
            last = step + 1 == cfg.steps
            if cfg.eval_clips and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                if info.is_main:
                    final = evaluate(model, processor, EVAL_SEEDS[:cfg.eval_clips], frame_size=frame_size,
                                     clip_seconds=cfg.clip_seconds, max_tokens_per_turn=cfg.max_tokens_per_turn,
                                     question_style=cfg.question_style,
                                     offline_question_first=cfg.offline_question_first)
                    evals.append({"step": step + 1, **final.to_dict()})
                    if bar is not None:
                        bar.write(f"step {step + 1} eval: {final.summary()}")
                distributed.barrier()
            if out_dir is not None and info.is_main and (last or evals and evals[-1]["step"] == step + 1):
                _save(model, processor, cfg, out_dir, history, evals, info.world_size,
                      time.perf_counter() - started, time.process_time() - cpu_started, run_info or {})
    finally:
        if bar is not None:
            bar.close()
    distributed.barrier()
    return TrainResult(history=history, final_metrics=final, evals=evals, out_dir=out_dir,
                       seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started)


def _step(runner: Any, model: Any, optimizer: torch.optim.Optimizer, samples: list[TrainingSample],
          cfg: TrainConfig, info: distributed.DistInfo, device: torch.device) -> tuple[float, float, int]:
    """One optimizer step on this rank's slice of the global batch -> (global loss, grad norm, global targets).

    The loss is the weighted sum over the GLOBAL number of targets; DDP averages gradients over the ranks, so
    each rank's loss is scaled by world_size and the result is the gradient of the whole batch's loss."""
    tokens = model.config.tokens
    batch = collate(samples, model.config.family, tokens.pad_token_id)
    labels, decisions = batch.pop("labels").to(device), batch.pop("decisions").to(device)
    replies = batch.pop("replies").to(device)
    if cfg.decision_kinds == "go_on":
        decisions = go_on_decisions(decisions, labels, tokens.silence_token_id)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    logits = runner(**batch, dedup_frames=True).logits  # static scenes repeat frames: each distinct one encoded once
    loss_sum, n_targets = weighted_lm_loss(logits, labels, tokens.silence_token_id, cfg.silence_weight,
                                           decisions, cfg.decision_weight, replies, cfg.reply_weight)
    total = distributed.all_reduce_sum(n_targets).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * info.world_size / total).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    loss = distributed.all_reduce_sum(loss_sum.detach()) / total
    return float(loss), float(grad_norm), int(total)


def _save(model: Any, processor: Any, cfg: TrainConfig, out_dir: Path, history: list, evals: list,
          world_size: int, seconds: float, cpu_seconds: float, run_info: dict[str, Any]) -> None:
    from ..checkpoints import save_model
    save_model(model, out_dir)
    processor.save_pretrained(out_dir)
    log = {**run_info, "train_config": dataclasses.asdict(cfg), "world_size": world_size, "seconds": seconds,
           "cpu_seconds": cpu_seconds,
           "history": history, "evals": evals, "final_metrics": evals[-1] if evals else None}
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":  # the documented entry point; the command line lives in train_cli
    from mossvl_lab.training.train_cli import main
    main()
