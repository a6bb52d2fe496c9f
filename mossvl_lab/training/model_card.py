"""Evaluate a trained checkpoint on the held-out clips and write its model card (README.md next to the weights).

    python -m mossvl_lab.training.model_card checkpoints/video-preview-tiny --clips 100

The card states what the checkpoint is, the command that trained it (recorded by the trainer in
train_log.json), its seeds, the machine and time it took, and the evaluation numbers against the targets the
project holds its shipped checkpoints to (`evaluate.TARGETS`); eval.json keeps the raw counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from ..data.synthetic import EVAL_SEEDS
from .evaluate import check_targets
from .metrics import Metrics


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file()) / 1e6


def render_card(root: Path, log: dict[str, Any], metrics: Metrics, clips: int, eval_seconds: float,
                family: str, processor_settings: dict[str, Any], parameters: int) -> str:
    train = log["train_config"]
    rows = "\n".join(f"| {t.label} | {_pct(value)} | {t.op} {_pct(t.value)} | {'yes' if met else 'no'} |"
                     for t, value, met in check_targets(metrics, family))
    delay = metrics.mean_delay_frames
    prompt = processor_settings.get("realtime_system_prompt")
    history = log.get("history", [])
    cpu = f" ({log['cpu_seconds'] / 60:.1f} CPU-minutes)" if "cpu_seconds" in log else ""
    time_line = (f"  Frames carry their timestamps in the prompt: {processor_settings.get('frame_timestamps', True)}.\n"
                 if family == "moss_vl" else "")
    extra = [log[k] for k in ("concurrency", "cpu_seconds_source") if k in log]
    note = "".join(f"\n  {text[0].upper() + text[1:]}." for text in extra)
    last_loss = history[-1]["loss"] if history else float("nan")
    offline_qa = ", answer offline timestamp questions" if family == "moss_vl" else ""
    return f"""# {root.name}

A tiny {family} model ({parameters / 1e6:.2f} M parameters, {_size_mb(root):.1f} MB on disk) trained from scratch
on CPU by mossvl-lab on the synthetic streaming task (`mossvl_lab.data.synthetic`: coloured shapes that appear,
leave, move and change colour at 1 fps; speak a caption at each event, stay silent otherwise, answer a
mid-stream colour question when asked and again when the answer changes{offline_qa}). It exists so
that every notebook, widget and test has a model that actually watches the frames; it knows nothing else.

## How it was trained

```
{log.get('command', '(command not recorded)')}
```

- {log.get('world_size', 1)} process(es), {log.get('seconds', 0) / 60:.1f} minutes wall time{cpu} on
  {log.get('machine', 'an unrecorded machine')}; final training loss {last_loss:.4f}.{note}
- Training clips: seed `(seed * 7919 + i * 104729) mod 1_000_000` for global sample i, run seed {train['seed']}
  (model init uses the same seed); {train['steps']} steps of {train['batch_size']} clips of
  {train['clip_seconds'][0]}-{train['clip_seconds'][1]} s{_grouping(train)}; AdamW lr {train['lr']} (warmup {train['warmup_steps']},
  cosine to {train['min_lr_ratio']}x), events per second in training clips {train.get('event_rate', 0.25)}{_kinds(train)}{_questions(train)},
  silence weight {train['silence_weight']}{_decisions(train)}, offline QA share {train['offline_qa_fraction']}{_turns(train)}.
- Real-time system prompt (saved in processor_config.json, used by every RealtimeSession on this checkpoint):
  {json.dumps(prompt) if prompt is not None else "the family's published prompt"}.
{time_line}

## Evaluation

Held-out clips `EVAL_SEEDS[:{clips}]` (seeds {EVAL_SEEDS[0]}..{EVAL_SEEDS[0] + clips - 1}, never trained on), streamed
frame by frame through a `RealtimeSession` with the greedy policy ({eval_seconds:.0f} s):

| metric | value | target | met |
|---|---|---|---|
{rows}

Mean response delay: {'n/a' if math.isnan(delay) else f'{delay:+.2f}'} frames. Counts: {metrics.recalled}/{metrics.targets} events
recalled, {metrics.false_alarms}/{metrics.quiet_frames} quiet frames with speech{f', {metrics.qa_correct}/{metrics.qa_total} timestamp questions' if metrics.qa_total else ''}.{_split(metrics)}{_qa_split(metrics)}

Reproduce: `mossvl-lab eval --checkpoint {root.as_posix()} --clips {clips}`.
"""


def _split_line(title: str, *parts: tuple[str, int, int]) -> str:
    """One card line splitting a rate into parts, each (label, right, asked)."""
    shares = ", ".join(f"{label} {_pct(right / asked if asked else None)} ({right}/{asked})"
                       for label, right, asked in parts)
    return f"\n{title} split: {shares}."


def _split(metrics: Metrics) -> str:
    """Caption exact match split into recalled targets that carry a reply to the mid-stream question and the rest."""
    if not metrics.reply_recalled:
        return ""
    return _split_line("Caption exact match",
                       ("event captions alone", metrics.exact - metrics.reply_exact,
                        metrics.recalled - metrics.reply_recalled),
                       ("targets carrying a reply", metrics.reply_exact, metrics.reply_recalled))


def _qa_split(metrics: Metrics) -> str:
    """Timestamp QA split into "when did ...?" questions and "what happened at T?" questions."""
    if not metrics.qa_when_total:
        return ""
    return _split_line("Timestamp QA", ('"when" questions', metrics.qa_when_correct, metrics.qa_when_total),
                       ('"what happened at" questions', metrics.qa_correct - metrics.qa_when_correct,
                        metrics.qa_total - metrics.qa_when_total))


def _kinds(train: dict) -> str:
    weights = train.get("event_kind_weights") or []
    odds = ", ".join(f"{kind} x{weight:g}" for kind, weight in weights)
    return f" (event kinds oversampled: {odds}; evaluation draws them uniformly)" if odds else ""


def _decisions(train: dict) -> str:
    weight, replies = train.get("decision_weight", 1.0), train.get("reply_weight", 1.0)
    kinds = "to go on after speech" if train.get("decision_kinds") == "go_on" else "to speak and to go on"
    return (f", decisions {kinds} weighted {weight:g}" if weight != 1.0 else "") + \
        (f", replies to mid-stream questions weighted {replies:g}" if replies != 1.0 else "")


def _questions(train: dict) -> str:
    extra = train.get("extra_questions", 0)
    pairs = (", each clip streamed twice, the second time asking about another shape"
             if train.get("question_pairs") else "")
    named = (", replies name the asked shape with a capital ('the Square is red'; scoring ignores case)"
             if train.get("question_style") == "named" else "")
    return (f", {1 + extra} mid-stream questions per training clip (evaluation clips ask one)" if extra else "") + \
        pairs + named


def _grouping(train: dict) -> str:
    window = train.get("group_by_length", 0)
    return f" (each window of {window} steps sorted by length into batches)" if window else ""


def _turns(train: dict) -> str:
    if not train["offline_qa_fraction"]:
        return ""
    turns = train.get("offline_qa_turns", 1)
    first = train.get("offline_question_first")
    if turns > 1:
        asked_first = ", the first asked before the video" if first else ""
        return f" (up to {turns} questions of one kind per offline sample{asked_first})"
    return " (the question asked before the video)" if first else ""


def write_model_card(root: str | Path, clips: int = 100, progress: bool = True,
                     reuse_eval: bool = False) -> tuple[Metrics, str]:
    """Evaluate the checkpoint at `root` on EVAL_SEEDS[:clips] and write README.md and eval.json there; returns
    (metrics, model family). reuse_eval: take the numbers from an existing eval.json of as many clips (to
    re-render the card only)."""
    import mossvl_lab as ml

    from .evaluate import evaluate, trained_eval_settings

    root = Path(root)
    log = json.loads((root / "train_log.json").read_text())
    model, processor = ml.load_model(root, progress=False).eval(), ml.load_processor(root)
    previous = json.loads((root / "eval.json").read_text()) if (root / "eval.json").exists() else {}
    if reuse_eval and previous.get("clips") == clips:
        per_clip, seconds = [Metrics(**counts) for counts in previous["per_clip"]], previous["seconds"]
    else:
        started = time.perf_counter()
        seeds = EVAL_SEEDS[:clips]
        if progress:
            from tqdm.auto import tqdm
            seeds = tqdm(seeds, desc="eval")
        # one clip at a time so eval.json keeps per-clip counts: a test re-checks any prefix of them
        settings = trained_eval_settings(root)
        per_clip = [evaluate(model, processor, [seed], **settings) for seed in seeds]
        seconds = time.perf_counter() - started
    metrics = sum(per_clip, Metrics())
    record = {"clips": clips, "first_seed": EVAL_SEEDS[0], "seconds": seconds, "metrics": metrics.to_dict(),
              "per_clip": [dataclasses.asdict(m) for m in per_clip]}
    (root / "eval.json").write_text(json.dumps(record) + "\n")
    processing = json.loads((root / "processor_config.json").read_text()).get("settings", {})
    parameters = sum(p.numel() for p in model.parameters())
    (root / "README.md").write_text(render_card(root, log, metrics, clips, seconds, model.config.family, processing,
                                                parameters))
    return metrics, model.config.family


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--clips", type=int, default=100, help="held-out clips to evaluate")
    parser.add_argument("--reuse-eval", action="store_true", help="re-render the card from an existing eval.json")
    args = parser.parse_args(argv)
    metrics, family = write_model_card(args.checkpoint, args.clips, reuse_eval=args.reuse_eval)
    print(f"{args.checkpoint}: {metrics.summary()}")
    return 0 if all(met for _, _, met in check_targets(metrics, family)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
