"""The trainer's command line: `python -m mossvl_lab.training.trainer --help` (that module runs `main` here).

Builds the model (a preset with overrides, or a checkpoint via --init) and its processor, turns the flags into a
`TrainConfig`, records how the run was started for the model card, and trains, under torchrun too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
from typing import Any

import torch

from ..data.synthetic import QUESTION_STYLES
from ..processing.templates import family_style
from . import distributed
from .trainer import TrainConfig, TrainResult, open_gates, train


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, processor) for the CLI: a preset (+ overrides, + toy vision) built with the run's seed and its
    cross-attention gates opened to --gate-init, or the checkpoint --init (used as it is)."""
    import mossvl_lab as ml
    from ..config import ToyConvConfig, override

    if args.init:
        return ml.load_model(args.init, progress=False).train(), ml.load_processor(args.init)
    cfg = ml.config.preset(args.preset)
    changes = dict(item.split("=", 1) for item in args.override)
    changes = {k: _parse_value(v) for k, v in changes.items()}
    if args.toy_vision:
        size = getattr(cfg.vision, "image_size", None)
        if family_style(cfg.family) != "llama3" or size is None:
            raise SystemExit("--toy-vision needs a family with the Mllama processor layout (video_preview, mllama)")
        changes["vision"] = ToyConvConfig(image_size=size)
    if changes:
        cfg = override(cfg, changes)
    torch.manual_seed(args.seed)
    model = ml.build_model(cfg)
    open_gates(model, args.gate_init)
    return model, ml.processor_for_model(cfg, config=processing_config(cfg, args))


def processing_config(cfg: Any, args: argparse.Namespace) -> Any:
    """The family's processing settings with --processor overrides and --system-prompt applied; they are saved
    with the checkpoint, so evaluation and sessions on it read frames and prompts as training did."""
    from ..processing.processor import ProcessingConfig

    changes = {k: _parse_value(v) for k, v in (item.split("=", 1) for item in args.processor)}
    if args.system_prompt is not None:
        changes["realtime_system_prompt"] = args.system_prompt
    base = ProcessingConfig.for_model(cfg)
    return ProcessingConfig.from_dict({**base.to_dict(), **changes})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m mossvl_lab.training.trainer",
                                description="Train any config on the synthetic streaming clips.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (mossvl_lab.config.presets())")
    src.add_argument("--init", help="start from this checkpoint directory (config, weights and tokenizer)")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                   help="config override, e.g. text.num_layers=2 or 'text.cross_attention_layers=[1]'")
    p.add_argument("--toy-vision", action="store_true", help="replace the vision tower by the toy conv encoder")
    p.add_argument("--gate-init", type=float, default=0.5,
                   help="initial cross-attention gates of a model built from --preset (0 = the zero init)")
    p.add_argument("--processor", action="append", default=[], metavar="FIELD=JSON",
                   help="processing setting override, e.g. video_min_pixels=4096 (saved with the checkpoint)")
    p.add_argument("--system-prompt", default=None,
                   help="real-time system prompt to train with (saved with the checkpoint; default: the family's)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, tokenizer, train_log.json)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--silence-weight", type=float, default=d.silence_weight)
    p.add_argument("--decision-weight", type=float, default=d.decision_weight,
                   help="loss weight of the decisions to speak (after each frame) and to go on (after each part)")
    p.add_argument("--reply-weight", type=float, default=d.reply_weight,
                   help="loss weight of the replies to mid-stream questions, their leading ', ' included")
    p.add_argument("--decision-kinds", choices=("all", "go_on"), default=d.decision_kinds,
                   help="the decisions --decision-weight weighs: all, or only those to go on after a spoken part")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-clips", type=int, default=d.eval_clips)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = no clipping")
    p.add_argument("--clip-seconds", type=int, nargs=2, default=list(d.clip_seconds), metavar=("MIN", "MAX"))
    p.add_argument("--frame-size", type=int, default=d.frame_size)
    p.add_argument("--event-rate", type=float, default=d.event_rate, help="scene events per second in training clips")
    p.add_argument("--event-weight", action="append", default=[], metavar="KIND=WEIGHT",
                   help="odds of an event kind in training clips relative to the others (default 1), e.g. move=3")
    p.add_argument("--extra-questions", type=int, default=d.extra_questions,
                   help="mid-stream questions per training clip beyond the one evaluation clips ask (0-2)")
    p.add_argument("--question-pairs", action="store_true",
                   help="stream each training clip twice, the second time asking about another shape")
    p.add_argument("--question-style", choices=QUESTION_STYLES, default=d.question_style,
                   help="how replies to mid-stream questions spell the shape: plain ('the square is red') or "
                        "named ('the Square is red', a spelling captions never use)")
    p.add_argument("--offline-qa-fraction", type=float, default=d.offline_qa_fraction)
    p.add_argument("--offline-qa-turns", type=int, default=d.offline_qa_turns,
                   help="questions per offline QA sample (one kind per sample)")
    p.add_argument("--offline-question-first", action="store_true",
                   help="ask the (first) offline question before the video instead of after it")
    p.add_argument("--group-by-length", type=int, default=d.group_by_length, metavar="STEPS",
                   help="sort the samples of each window of STEPS steps by length into batches (less padding); 0 = off")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--train-seeds", default="", help="comma-separated fixed clip seeds (default: endless stream)")
    p.add_argument("--max-tokens-per-turn", type=int, default=d.max_tokens_per_turn)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                       silence_weight=args.silence_weight, decision_weight=args.decision_weight,
                       decision_kinds=args.decision_kinds, reply_weight=args.reply_weight,
                       eval_every=args.eval_every, eval_clips=args.eval_clips,
                       seed=args.seed, grad_clip=args.grad_clip or None, clip_seconds=tuple(args.clip_seconds),
                       event_rate=args.event_rate, event_kind_weights=_kind_weights(args.event_weight),
                       extra_questions=args.extra_questions, question_pairs=args.question_pairs,
                       question_style=args.question_style,
                       frame_size=args.frame_size,
                       offline_qa_fraction=args.offline_qa_fraction, offline_qa_turns=args.offline_qa_turns,
                       offline_question_first=args.offline_question_first,
                       out_dir=args.out, log_every=args.log_every,
                       train_seeds=tuple(int(s) for s in args.train_seeds.split(",") if s.strip()),
                       max_tokens_per_turn=args.max_tokens_per_turn, group_by_length=args.group_by_length)


def _kind_weights(items: list[str]) -> tuple[tuple[str, float], ...]:
    try:
        return tuple((kind, float(weight)) for kind, weight in (item.split("=", 1) for item in items))
    except ValueError:
        raise SystemExit(f"--event-weight takes KIND=WEIGHT (e.g. move=3), got {items}") from None


def _run_info(world_size: int, argv: list[str]) -> dict[str, str]:
    """How this run was started and where, for the model card."""
    launcher = f"torchrun --nproc_per_node {world_size} -m" if world_size > 1 else "python -m"
    threads = torch.get_num_threads()
    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {threads} torch thread(s) " \
              f"per process, torch {torch.__version__}"
    return {"command": " ".join([launcher, "mossvl_lab.training.trainer", *map(shlex.quote, argv)]),
            "machine": machine}


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = distributed.init_distributed(args.device)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        model, processor = build_from_args(args)
        model.to(info.device)
        run_info = _run_info(info.world_size, sys.argv[1:] if argv is None else argv)
        result = train(model, processor, cfg, progress=not args.no_progress, run_info=run_info)
        if info.is_main and result.final_metrics is not None:
            print(f"final eval: {result.final_metrics.summary()}")
        return result
    finally:
        distributed.shutdown()
