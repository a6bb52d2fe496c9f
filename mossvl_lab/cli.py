"""The `mossvl-lab` command.

    mossvl-lab demo [--checkpoint DIR] [--seed N] [--out demo.png]
    mossvl-lab stream VIDEO --checkpoint DIR [--prompt TEXT] [--fps 1] [--out stream.png]

Heavy imports happen inside the subcommands so `mossvl-lab --help` stays instant.
"""

from __future__ import annotations

import argparse
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

    started = time.perf_counter()
    model, processor, where = _load(args.checkpoint, args.preset)
    size = getattr(model.config.vision, "image_size", 64)
    clip = make_clip(args.seed if args.seed is not None else EVAL_SEEDS[0], size=size, max_seconds=args.max_seconds)
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
