"""Cost of idle hook points: the instrumented model vs the same model with every site removed.

Both models share weights; runs alternate (A B A B ...) in one process so machine noise hits both alike,
and the ratio of medians is printed. Usage: python benchmarks/hooks_overhead.py [--preset video-preview-small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mossvl_lab as ml
from mossvl_lab.hooks import HookPoint


def strip_hook_points(model: torch.nn.Module) -> int:
    """Replace every HookPoint by a bare identity function (not a module): the 'built without hooks' model."""
    removed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, HookPoint):
                del module._modules[name]
                object.__setattr__(module, name, _IDLE)
                removed += 1
    return removed


class _Idle:
    """A plain callable, not a module: what a site costs when no instrumentation exists at all."""

    active = False

    def __call__(self, x):
        return x


_IDLE = _Idle()


def _time(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="video-preview-small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--text", type=int, default=96)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ml.config.preset(args.preset)
    instrumented = ml.build_model(cfg).eval()
    bare = ml.build_model(cfg).eval()
    bare.load_state_dict(instrumented.state_dict())
    removed = strip_hook_points(bare)

    image, size = cfg.tokens.image_token_id, cfg.vision.image_size
    ids = torch.randint(0, min(1000, cfg.text.vocab_size), (1, args.text))
    ids[ids == image] = 0  # placeholders only where the frames are
    ids[0, :args.frames] = image
    pixels = torch.randn(1, args.frames, 1, 3, size, size)
    prefill = dict(input_ids=ids, pixel_values=pixels)

    def decode_step(model):
        state = ml.StreamState()
        model(**prefill, state=state)
        mark = state.mark()
        return lambda: (model(ids[:, -1:], state=state), state.restore(mark))

    results = {}
    with torch.inference_mode():
        for label, make in (("prefill forward", lambda m: (lambda: m(**prefill))), ("decode step", decode_step)):
            runs = {"instrumented": make(instrumented), "bare": make(bare)}
            for fn in runs.values():
                fn()  # warm-up
            times = {k: [] for k in runs}
            for round_index in range(args.rounds):
                order = list(runs) if round_index % 2 == 0 else list(reversed(list(runs)))  # neither always first
                for key in order:
                    times[key].append(_time(runs[key], 3 if label == "prefill forward" else 20))
            results[label] = {k: statistics.median(v) for k, v in times.items()}

    print(f"preset {args.preset}: {removed} hook points; {args.frames} frames + {args.text} tokens; "
          f"{args.rounds} interleaved rounds, medians")
    for label, r in results.items():
        ratio = r["instrumented"] / r["bare"]
        print(f"  {label:16s} instrumented {r['instrumented'] * 1e3:8.2f} ms   bare {r['bare'] * 1e3:8.2f} ms   "
              f"ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
