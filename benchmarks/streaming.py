"""Streaming performance, measured side by side in one process (ratios, not bare times).

Both sides use the same `mllama`-family config at video-preview-small size (no pooling, stock cross-attention)
and the same weights: ours runs a RealtimeSession whose caches already hold the frames; transformers'
MllamaForConditionalGeneration.generate re-reads all N frames for every prompt.

    python benchmarks/streaming.py                 # N = 16, 64, 256 (a few minutes on 2 CPU cores)
    python benchmarks/streaming.py --frames 16 64  # quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

import mossvl_lab as ml
from mossvl_lab.streaming.events import FrameIngested, TextDelta
from mossvl_lab.streaming.session import RealtimeSession


class SpeakAfterPrompt:
    """Silent while frames stream in; after a prompt, answers (never picks silence)."""

    def __init__(self) -> None:
        self.speak = False

    def __call__(self, logits, ctx):
        if not self.speak:
            return ctx.silence_id
        masked = logits.clone()
        masked[ctx.silence_id] = float("-inf")
        if ctx.banned_ids:
            masked[list(ctx.banned_ids)] = float("-inf")
        return int(masked.argmax())


def mllama_small() -> ml.config.ModelConfig:
    cfg = ml.config.preset("video-preview-small")
    return ml.config.override(cfg, {"family": "mllama", "cross_attention": {}, "vision.pool_mode": "none",
                                    "vision.full_attention": False, "vision.intermediate_tap": "layer_output"})


def frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def run_ours(model, processor, clip, prompt, decode_tokens):
    """Ingest the clip frame by frame, then time prompt -> first text and the decode rate."""
    policy = SpeakAfterPrompt()
    session = RealtimeSession(model, processor, policy=policy, max_frames_queued=len(clip) + 1)
    session.step()
    ingest_ms = []
    for i, image in enumerate(clip):
        session.push_frame(image, float(i))
        events = session.step()
        ingest_ms += [e.ms for e in events if isinstance(e, FrameIngested)]
    policy.speak = True
    started = time.perf_counter()
    session.push_prompt(prompt)
    while not any(isinstance(e, TextDelta) for e in session.step()):
        pass
    first_text = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(decode_tokens):
        session.step()
    rate = decode_tokens / (time.perf_counter() - started)
    stream = session.state.stream
    session.close()
    return ingest_ms, first_text, rate, stream


def run_transformers(reference, processor, model_cfg, clip, prompt, decode_tokens):
    """generate() over all frames + the prompt: time to the first token, then the decode rate."""
    image = processor.image_token_id
    ids = processor.tokenizer.encode(prompt)
    input_ids = torch.tensor([[image] * len(clip) + ids])
    vision = processor("<|image|>" * len(clip), images=clip)
    inputs = dict(input_ids=input_ids, pixel_values=vision["pixel_values"], aspect_ratio_ids=vision["aspect_ratio_ids"],
                  aspect_ratio_mask=vision["aspect_ratio_mask"],
                  cross_attention_mask=torch.ones(1, input_ids.shape[1], len(clip), 1, dtype=torch.long))
    eos = model_cfg.tokens.eos_token_ids[0]
    with torch.inference_mode():
        started = time.perf_counter()
        reference.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        first = time.perf_counter() - started
        started = time.perf_counter()
        reference.generate(**inputs, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1,
                           do_sample=False, eos_token_id=eos, pad_token_id=eos)
        rate = decode_tokens / max(time.perf_counter() - started - first, 1e-9)
    return first, rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    cfg = mllama_small()
    model = ml.build_model(cfg).eval()
    processor = ml.processor_for_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ml.save_model(model, tmp)  # the hub layout transformers reads
        reference = MllamaForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa").eval()
    prompt = "What changed in the scene?"
    size = cfg.vision.image_size
    print(f"config: mllama family at video-preview-small size, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} "
          f"M parameters, {cfg.vision.tokens_per_tile} vision tokens per frame, {torch.get_num_threads()} threads")
    rows, ours_first = [], {}
    for n in sorted(args.frames):
        clip = frames(n, size, seed=n)
        ingest, first, rate, stream = run_ours(model, processor, clip, prompt, args.decode_tokens)
        hf_first, hf_rate = run_transformers(reference, processor, cfg, clip, prompt, args.decode_tokens)
        ours_first[n] = first
        rows.append((n, first, hf_first, rate, hf_rate))
        if n == max(args.frames):
            early, late = statistics.median(ingest[:8]), statistics.median(ingest[-8:])
            text = cfg.text
            theory = cfg.vision.tokens_per_tile * 2 * text.num_kv_heads * text.d_head * 4 * len(
                text.cross_attention_layers)
            measured = stream.vision.memory_bytes() / stream.vision.num_frames
    print(f"\n{'frames':>6} | {'prompt->first text: ours':>25} | {'transformers':>12} | {'speed-up':>8} | "
          f"{'decode tok/s: ours':>18} | {'transformers':>12} | {'ratio':>5}")
    for n, first, hf_first, rate, hf_rate in rows:
        print(f"{n:>6} | {first * 1e3:>22.1f} ms | {hf_first * 1e3:>9.1f} ms | {hf_first / first:>7.1f}x | "
              f"{rate:>18.1f} | {hf_rate:>12.1f} | {rate / hf_rate:>5.2f}")
    lo, hi = min(ours_first), max(ours_first)
    print(f"\nours prompt->first text, {hi} vs {lo} cached frames: ratio {ours_first[hi] / ours_first[lo]:.2f}")
    print(f"per-frame ingest, frames 1-8 vs {max(args.frames) - 7}-{max(args.frames)}: {early:.1f} ms vs "
          f"{late:.1f} ms, ratio {late / early:.2f}")
    print(f"vision cache bytes per frame: measured {measured:,.0f}, theory (tokens x 2 x kv_heads x d_head x 4 B x "
          f"cross layers) {theory:,}, equal: {measured == theory}")


if __name__ == "__main__":
    main()
