"""Streaming performance, measured side by side in one process (ratios, not bare times).

Both sides use the same `mllama`-family config at video-preview-small size (no pooling, stock cross-attention)
and the same weights: ours answers from a RealtimeSession's caches that already hold the frames;
transformers' MllamaForConditionalGeneration.generate re-reads all N frames for every prompt. This VM's
timings swing by 2x between runs, so every number of ours is the median of rolled-back repeats on the
session's caches (StreamState.mark / restore) and transformers' time to first token a median too. Decoding is
timed step by step in alternation (one step of ours, one of transformers, ...), so both sides see the same machine.

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
from mossvl_lab.processing.templates import barge_in_text
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


EARLY_FRAMES = 8  # "early" ingest: one more frame after this many cached (or after all, in a shorter clip)


def mllama_small() -> ml.config.ModelConfig:
    cfg = ml.config.preset("video-preview-small")
    return ml.config.override(cfg, {"family": "mllama", "cross_attention": {}, "vision.pool_mode": "none",
                                    "vision.full_attention": False, "vision.intermediate_tap": "layer_output"})


def frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def timed(fn, state, repeats: int) -> float:
    """Median wall time of `fn` run on the session's caches, each run rolled back (state.mark / restore)."""
    times = []
    for _ in range(repeats):
        mark = state.mark()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        state.restore(mark)
    return statistics.median(times)


def run_ours(model, processor, clip, prompt, repeats):
    """Stream the clip into a RealtimeSession (its caches are what we measure on), then time, as medians of
    `repeats` rolled-back runs: ingesting one more frame early (after EARLY_FRAMES) and late (after all), and the
    prompt step (barge-in text, one forward, the first answer token). Returns those and the caches, which then hold
    the prompt (what decoding continues from)."""
    session = RealtimeSession(model, processor, policy=SpeakAfterPrompt(), max_frames_queued=len(clip) + 1)
    session.step()
    stream, silence, image = session.stream, session.silence_id, model.config.tokens.image_token_id
    extra = processor("<|image|>", images=[clip[0]])
    frame_inputs = {k: extra[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    ids = lambda tokens: torch.tensor([tokens])  # noqa: E731

    def ingest():
        model(ids([silence, image]), state=stream, **frame_inputs)

    early = None
    with torch.inference_mode():
        for i, picture in enumerate(clip):
            session.push_frame(picture, float(i))
            session.step()
            if i + 1 == min(EARLY_FRAMES, len(clip)):
                early = timed(ingest, stream, repeats)
        late = timed(ingest, stream, repeats)
        prompt_ids = ids([silence] + session._encode(barge_in_text(model.config.family, prompt)))
        first_text = timed(lambda: int(model(prompt_ids, state=stream).logits[0, -1].argmax()), stream, repeats)
        model(prompt_ids, state=stream)
    session.close()
    return early, late, first_text, stream


def ours_decode_step(model, stream):
    """One decode step on the session's caches (rolled back after, so every step sees the same cache)."""
    mark = stream.mark()
    model(torch.tensor([[42]]), state=stream)
    stream.restore(mark)


def run_transformers(reference, processor, model_cfg, clip, prompt, repeats):
    """generate() over all frames + the prompt: median time to the first token; returns it and a function
    running one decode step on transformers' own KV cache (what generate does per token)."""
    image = processor.image_token_id
    ids = processor.tokenizer.encode(prompt)
    input_ids = torch.tensor([[image] * len(clip) + ids])
    vision = processor("<|image|>" * len(clip), images=clip)
    inputs = dict(input_ids=input_ids, pixel_values=vision["pixel_values"], aspect_ratio_ids=vision["aspect_ratio_ids"],
                  aspect_ratio_mask=vision["aspect_ratio_mask"],
                  cross_attention_mask=torch.ones(1, input_ids.shape[1], len(clip), 1, dtype=torch.long))
    eos = model_cfg.tokens.eos_token_ids[0]
    with torch.inference_mode():
        firsts = []
        for _ in range(repeats):
            started = time.perf_counter()
            reference.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            firsts.append(time.perf_counter() - started)
        out = reference(**inputs, use_cache=True)
    cache = {"past": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}
    last_row = inputs["cross_attention_mask"][:, -1:]

    def decode_step():
        out = reference(input_ids=cache["token"], past_key_values=cache["past"], cross_attention_mask=last_row,
                        use_cache=True)
        cache["past"], cache["token"] = out.past_key_values, out.logits[:, -1:].argmax(-1)

    return statistics.median(firsts), decode_step


def decode_rates(ours_step, theirs_step, steps: int) -> tuple[float, float]:
    """Tokens/s of both sides from `steps` alternating decode steps (medians, after two warm-up pairs)."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    with torch.inference_mode():
        for i in range(steps + 2):
            for side, step in (("ours", ours_step), ("theirs", theirs_step)):
                started = time.perf_counter()
                step()
                if i >= 2:
                    times[side].append(time.perf_counter() - started)
    return 1.0 / statistics.median(times["ours"]), 1.0 / statistics.median(times["theirs"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--decode-tokens", type=int, default=48, help="alternating decode steps per side")
    parser.add_argument("--repeats", type=int, default=7, help="runs per measurement of ours (medians)")
    parser.add_argument("--hf-repeats", type=int, default=3, help="runs per transformers time to first token")
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
        early, late, first, stream = run_ours(model, processor, clip, prompt, args.repeats)
        hf_first, hf_step = run_transformers(reference, processor, cfg, clip, prompt, args.hf_repeats)
        rate, hf_rate = decode_rates(lambda: ours_decode_step(model, stream), hf_step, args.decode_tokens)
        del stream, hf_step  # both sides' caches for N frames
        ours_first[n] = first
        rows.append((n, first, hf_first, rate, hf_rate))
    print(f"\n{'frames':>6} | {'prompt->first text: ours':>25} | {'transformers':>12} | {'speed-up':>8} | "
          f"{'decode tok/s: ours':>18} | {'transformers':>12} | {'ratio':>5}")
    for n, first, hf_first, rate, hf_rate in rows:
        print(f"{n:>6} | {first * 1e3:>22.1f} ms | {hf_first * 1e3:>9.1f} ms | {hf_first / first:>7.1f}x | "
              f"{rate:>18.1f} | {hf_rate:>12.1f} | {rate / hf_rate:>5.2f}")
    lo, hi = min(ours_first), max(ours_first)
    early_at = min(EARLY_FRAMES, hi)
    print(f"\nmllama family (257 unpooled keys per frame): ours prompt->first text {hi} vs {lo} cached frames: "
          f"ratio {ours_first[hi] / ours_first[lo]:.2f}; ingest after {early_at} vs after {hi}: "
          f"ratio {late / early:.2f}")

    # the MOSS-Video-Preview configuration itself: 17 pooled tokens per frame, keys rotated by frame position
    native_cfg = ml.config.preset("video-preview-small")
    native = ml.build_model(native_cfg).eval()
    native_processor = ml.processor_for_model(native_cfg)
    native_first = {}
    for n in (lo, hi):
        clip = frames(n, native_cfg.vision.image_size, seed=n)
        early, late, first, stream = run_ours(native, native_processor, clip, prompt, args.repeats)
        native_first[n] = first
    with torch.inference_mode():
        rate = 1.0 / timed(lambda: native(torch.tensor([[42]]), state=stream), stream, args.decode_tokens)
    text = native_cfg.text
    theory = native_cfg.vision.tokens_per_tile * 2 * text.num_kv_heads * text.d_head * 4 * len(
        text.cross_attention_layers)
    measured = stream.vision.memory_bytes() / stream.vision.num_frames
    print(f"\nvideo-preview-small ({native_cfg.vision.tokens_per_tile} pooled tokens per frame):")
    print(f"  prompt->first text {hi} vs {lo} cached frames: {native_first[hi] * 1e3:.1f} ms vs "
          f"{native_first[lo] * 1e3:.1f} ms, ratio {native_first[hi] / native_first[lo]:.2f}")
    print(f"  ingesting one frame after {early_at} vs after {hi} cached frames: {early * 1e3:.1f} ms vs "
          f"{late * 1e3:.1f} ms, ratio {late / early:.2f}")
    print(f"  decode with {hi} cached frames: {rate:.1f} tokens/s")
    print(f"  vision cache bytes per frame: measured {measured:,.0f}, theory (tokens x 2 x kv_heads x d_head x 4 B x "
          f"cross layers) {theory:,}, equal: {measured == theory}")


if __name__ == "__main__":
    main()
