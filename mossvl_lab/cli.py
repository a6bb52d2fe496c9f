"""The `mossvl-lab` command.

    mossvl-lab demo [--checkpoint DIR] [--seed N] [--out demo.png]
    mossvl-lab stream VIDEO --checkpoint DIR [--prompt TEXT] [--fps 1] [--out stream.png]
    mossvl-lab eval --checkpoint DIR [--clips N] [--json OUT] [--cache-policy JSON]
    mossvl-lab ablate SPEC [--out DIR] [--jobs N] [--only VARIANT] [--report-only]

Heavy imports happen inside the subcommands so `mossvl-lab --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _load(checkpoint: str | None, preset: str):
    import mossvl_lab as ml
    from mossvl_lab.demo import DEFAULT_CHECKPOINT

    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if (path / "config.json").exists():
        return ml.load_model(path), ml.load_processor(path), str(path)
    if checkpoint:
        raise SystemExit(f"no checkpoint at {path} (expected config.json, *.safetensors and tokenizer files)")
    print(f"note: {path} has no trained checkpoint yet; using a randomly initialised {preset} "
          f"(it will talk nonsense)", file=sys.stderr)
    cfg = ml.config.preset(preset)
    return ml.build_model(cfg).eval(), ml.processor_for_model(cfg), f"random {preset}"


def _report(trace, out: str, title: str, started: float) -> None:
    from mossvl_lab.viz.timeline import plot_trace

    print(trace.timeline())
    print(f"wrote {plot_trace(trace, out, title=title)} ({time.perf_counter() - started:.1f} s)")


def _demo(args: argparse.Namespace) -> int:
    from mossvl_lab.data.synthetic import EVAL_SEEDS, make_clip
    from mossvl_lab.demo import trace_synthetic
    from mossvl_lab.training.evaluate import trained_eval_settings

    started = time.perf_counter()
    model, processor, where = _load(args.checkpoint, args.preset)
    size = getattr(model.config.vision, "image_size", 64)
    style = trained_eval_settings(where).get("question_style", "plain")  # expect replies as the model was trained
    clip = make_clip(args.seed if args.seed is not None else EVAL_SEEDS[0], size=size, max_seconds=args.max_seconds,
                     question_style=style)
    print(f"model: {where}; held-out clip seed {clip.seed}: {len(clip.timestamps)} s, "
          f"question at {clip.question.asked_at} s: {clip.question.text!r}")
    print("expected speech: " + "; ".join(f"{k}s {text}" for k, text in sorted(clip.speech().items())))
    _report(trace_synthetic(model, processor, clip), args.out, f"{where}: clip {clip.seed}", started)
    return 0


def _stream(args: argparse.Namespace) -> int:
    from mossvl_lab.demo import trace_clip
    from mossvl_lab.processing.video import VideoSampling, decode_video

    started = time.perf_counter()
    model, processor, where = _load(args.checkpoint, args.preset)
    video = decode_video(args.video, VideoSampling.moss_vl(video_fps=args.fps, max_frames=args.max_frames))
    question = (0, args.prompt) if args.prompt else None
    trace = trace_clip(model, processor, video.frames, list(video.timestamps), question=question)
    _report(trace, args.out, f"{where}: {Path(args.video).name}", started)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Score a checkpoint on the first held-out clips; exit 0 when every target of its family is met."""
    import mossvl_lab as ml
    from mossvl_lab.data.synthetic import EVAL_SEEDS
    from mossvl_lab.training.evaluate import (DEFAULT_EVAL_CLIPS, cache_policy_from_spec, check_targets, evaluate,
                                              trained_eval_settings)

    path = Path(args.checkpoint)
    if not (path / "config.json").exists():
        raise SystemExit(f"no checkpoint at {path} (expected config.json, *.safetensors and tokenizer files)")
    clips = DEFAULT_EVAL_CLIPS if args.clips is None else args.clips
    if not 1 <= clips <= len(EVAL_SEEDS):
        raise SystemExit(f"--clips must be in 1..{len(EVAL_SEEDS)}, got {clips}")
    settings = trained_eval_settings(path)
    model, processor = ml.load_model(path, progress=False), ml.load_processor(path)
    try:
        policies = cache_policy_from_spec(json.loads(args.cache_policy), model) if args.cache_policy else None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise SystemExit(f"--cache-policy: {exc}") from None
    started = time.perf_counter()
    metrics = evaluate(model, processor, EVAL_SEEDS[:clips], progress=True, cache_policy=policies, **settings)
    print(f"{path}: {metrics.clips} held-out clips, {metrics.frames} frames "
          f"({time.perf_counter() - started:.1f} s)")
    print(metrics.summary())
    results = check_targets(metrics, model.config.family)
    for target, value, met in results:
        shown = "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
        print(f"  {'ok  ' if met else 'MISS'} {target.label}: {shown} (target {target.op} {100 * target.value:.0f}%)")
    passed = all(met for _, _, met in results)
    missed = [t.label for t, _, met in results if not met]
    print("PASS: every target met" if passed else f"FAIL: not met: {', '.join(missed)}")
    if args.json:
        report = {"checkpoint": str(path), "settings": settings, "metrics": metrics.to_dict(),
                  "targets": [{"metric": t.metric, "op": t.op, "target": t.value,
                               "value": None if math.isnan(v) else v, "met": met} for t, v, met in results],
                  "passed": passed}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if passed else 1


def _ablate(args: argparse.Namespace) -> int:
    """Run the spec's missing runs (unless --report-only), then write and print the report."""
    from mossvl_lab.training.ablate import AblationSpecError, load_spec, plan, run_all
    from mossvl_lab.training.ablate_report import markdown_table, write_report

    try:
        spec = load_spec(args.spec)
        out = Path(args.out) if args.out else Path("ablations") / spec.name
        runs = plan(spec, out, tuple(args.only))
        failed = [] if args.report_only else run_all(runs, jobs=args.jobs)
    except AblationSpecError as exc:
        raise SystemExit(f"ablate: {exc}") from None
    summary, files = write_report(spec, out)
    if not summary:
        raise SystemExit(f"ablate: no finished runs under {out / 'runs'} (run without --report-only first)")
    print(f"wrote {', '.join(str(f) for f in files)}")
    print(markdown_table(summary))
    missing = [r.label for r in runs if not (r.dir / "metrics.json").exists()]
    if missing:
        print(f"not finished: {', '.join(missing)}" + (f" ({len(failed)} failed)" if failed else ""))
    return 1 if failed or missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mossvl-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream a held-out synthetic clip through the shipped checkpoint")
    demo.add_argument("--checkpoint", help="checkpoint directory (default: checkpoints/video-preview-tiny)")
    demo.add_argument("--preset", default="video-preview-tiny", help="random model when no checkpoint exists")
    demo.add_argument("--seed", type=int, help="clip seed (default: the first held-out seed)")
    demo.add_argument("--max-seconds", type=int, default=20)
    demo.add_argument("--out", default="demo.png")
    demo.set_defaults(run=_demo)
    stream = sub.add_parser("stream", help="stream any video file through a checkpoint")
    stream.add_argument("video")
    stream.add_argument("--checkpoint", required=True)
    stream.add_argument("--preset", default="video-preview-tiny")
    stream.add_argument("--prompt", default="")
    stream.add_argument("--fps", type=float, default=1.0)
    stream.add_argument("--max-frames", type=int, default=64)
    stream.add_argument("--out", default="stream.png")
    stream.set_defaults(run=_stream)
    ev = sub.add_parser("eval", help="score a checkpoint on the held-out synthetic benchmark against the targets")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (its train_log.json, if any, sets "
                                                         "clip lengths and frame size)")
    ev.add_argument("--clips", type=int, default=None, help="held-out clips (default: DEFAULT_EVAL_CLIPS, 50)")
    ev.add_argument("--json", help="also write the metrics and target checks to this JSON file")
    ev.add_argument("--cache-policy", help='session cache policy as JSON, e.g. \'{"window": {"frames": 4}}\'')
    ev.set_defaults(run=_eval)
    ablate = sub.add_parser("ablate", help="train + evaluate every variant x seed of an ablation spec, then report")
    ablate.add_argument("spec", help="YAML or JSON spec (see mossvl_lab.training.ablate)")
    ablate.add_argument("--out", help="output directory (default: ablations/<spec name>)")
    ablate.add_argument("--jobs", type=int, default=1, help="runs at once, each a one-thread subprocess when > 1")
    ablate.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="run only this variant (repeatable); the report still covers every finished run")
    ablate.add_argument("--report-only", action="store_true", help="only write the report from finished runs")
    ablate.set_defaults(run=_ablate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
