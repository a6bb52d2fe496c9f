"""The `mossvl-lab` command.

Heavy imports (torch, numpy, the model) happen inside the subcommands so `mossvl-lab --help`
stays instant and a broken optional dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import sys
import time


def _moving_square(n_frames: int, size: int, seed: int):
    """Synthetic clip: a white square sliding left to right over noise. -> uint8 [frame, H, W, 3]"""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 64, size=(n_frames, size, size, 3), dtype=np.uint8)
    side = max(1, size // 4)
    for i in range(n_frames):
        x = (i * (size - side)) // max(1, n_frames - 1)
        frames[i, size // 2 - side // 2:size // 2 + side - side // 2, x:x + side] = 255
    return frames


def _demo_inputs(cfg, n_frames: int, seed: int) -> dict:
    """Mllama-style inputs for one clip: one tile per frame, one image token + 3 text tokens per frame."""
    import torch

    size = cfg.vision.image_size
    clip = torch.from_numpy(_moving_square(n_frames, size, seed))              # [frame, H, W, 3] uint8
    pixels = clip.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)       # [frame, 3, H, W] in [-1, 1]
    pixel_values = pixels[None, :, None]                                        # [batch, frame, tile, 3, H, W]

    t = cfg.tokens
    special = {t.image_token_id, t.bos_token_id, t.pad_token_id, *t.eos_token_ids,
               t.silence_token_id, t.response_token_id, t.ellipsis_token_id}
    text_ids = torch.tensor([i for i in range(cfg.text.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    ids = [t.bos_token_id]
    for _ in range(n_frames):
        pick = text_ids[torch.randint(len(text_ids), (3,), generator=gen)]
        ids += [t.image_token_id, *pick.tolist()]

    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),                     # [batch, pos]
        "pixel_values": pixel_values,
        "aspect_ratio_ids": torch.ones(1, n_frames, dtype=torch.long),         # [batch, frame]
        "aspect_ratio_mask": torch.ones(1, n_frames, 1, dtype=torch.long),     # [batch, frame, tile]
    }


def _demo(args: argparse.Namespace) -> int:
    import torch

    import mossvl_lab as ml

    torch.manual_seed(args.seed)
    cfg = ml.config.preset(args.preset)
    start = time.perf_counter()
    model = ml.build_model(cfg).eval()
    build_s = time.perf_counter() - start

    inputs = _demo_inputs(cfg, args.frames, args.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(**inputs)
    forward_s = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset            {args.preset} (random weights, seed {args.seed})")
    print(f"parameters        {n_params:,}")
    for name, value in inputs.items():
        print(f"{name:<17} {tuple(value.shape)}")
    print(f"logits            {tuple(out.logits.shape)}")
    print(f"build             {build_s * 1000:.1f} ms")
    print(f"forward           {forward_s * 1000:.1f} ms")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mossvl-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny random model and run one forward on a synthetic clip")
    demo.add_argument("--preset", default="video-preview-tiny", help="config preset name (default: %(default)s)")
    demo.add_argument("--frames", type=_positive_int, default=4, help="frames in the synthetic clip (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights, clip and text ids (default: %(default)s)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
