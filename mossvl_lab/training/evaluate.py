"""The synthetic streaming benchmark: held-out clips streamed through a RealtimeSession, scored by `metrics`.

Each clip is played frame by frame with the greedy ArgmaxPolicy: the mid-stream question is pushed together
with its frame (the layout training uses), and after each frame the session steps until it parks on
`<|silence|>` (a per-turn token cap forces the silence), so whatever it says in that round is "speech after
that frame". For families whose frames carry timestamps (MOSS-VL) the clip's offline timestamp questions are
also answered with greedy `model.generate` on the prompt `offline_qa_sample` trains on.

`TARGETS` are the benchmark's pass marks (issue 7); `check_targets` scores a `Metrics` against them, so the
`mossvl-lab eval` command and CI checks share one definition.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..data.synthetic import EVAL_SEEDS, Clip, make_clip
from ..processing.templates import family_style
from ..streaming import cache_policies
from ..streaming.events import RoundEnd, RoundStart, TextDelta
from ..streaming.policies import ArgmaxPolicy
from ..streaming.session import RealtimeSession
from .metrics import Metrics, score_clip, score_qa
from .streams import offline_prompt

logger = logging.getLogger(__name__)

DEFAULT_EVAL_CLIPS = 50


@dataclass(frozen=True)
class Target:
    """One pass mark: `metric` (a `Metrics` rate) compared with `value` by `op`; `chatml_only` marks targets
    that exist only where frames carry timestamps (MOSS-VL's timestamp QA)."""

    metric: str
    op: Literal[">=", "<="]
    value: float
    label: str
    chatml_only: bool = False

    def met(self, observed: float) -> bool:
        """An undefined rate (NaN: nothing to measure) never meets a target."""
        if math.isnan(observed):
            return False
        return observed >= self.value if self.op == ">=" else observed <= self.value


TARGETS: tuple[Target, ...] = (
    Target("event_recall", ">=", 0.95, "event recall"),
    Target("false_alarm_rate", "<=", 0.05, "false alarms"),
    Target("caption_exact_match", ">=", 0.90, "caption exact match"),
    Target("qa_accuracy", ">=", 0.90, "timestamp QA", chatml_only=True),
)


def check_targets(metrics: Metrics, family: str) -> list[tuple[Target, float, bool]]:
    """(target, observed rate, met) for every target that applies to `family`."""
    chatml = family_style(family) == "chatml"
    return [(t, getattr(metrics, t.metric), t.met(getattr(metrics, t.metric)))
            for t in TARGETS if chatml or not t.chatml_only]


# spec key -> policy class, keyed by each policy's own `name` so spec, events and class agree
CACHE_POLICIES = {cls.name: cls for cls in (cache_policies.Unbounded, cache_policies.VisionWindow,
                                            cache_policies.PoolAged, cache_policies.TextWindow)}


def cache_policy_from_spec(spec: Mapping[str, Any] | list | None, model: Any = None) -> list[Any]:
    """Cache policies from plain data: `{"window": {"frames": 4}}`, several keys (applied in order) or a list of
    such one-key mappings; None = no policy. Keys: unbounded, window, pool, text_window (the classes of
    streaming.cache_policies, their keyword arguments as values). With `model`, pool policies keep the tokens
    its tower puts around each frame (`PoolAged.for_model`). Bad names or arguments raise ValueError."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, Mapping) else spec
    if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
        raise ValueError(f"cache_policy must be a mapping {{name: {{arguments}}}} or a list of them, got {spec!r}")
    policies = []
    for item in items:
        for name, kwargs in item.items():
            if name not in CACHE_POLICIES:
                raise ValueError(f"unknown cache policy {name!r}; known: {sorted(CACHE_POLICIES)}")
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise ValueError(f"cache policy {name!r}: arguments must be a mapping, got {kwargs!r}")
            try:
                policy = CACHE_POLICIES[name](**(kwargs or {}))
            except TypeError as exc:  # unknown keyword: name the policy, not the dataclass internals
                raise ValueError(f"cache policy {name!r}: {exc}") from None
            if model is not None and isinstance(policy, cache_policies.PoolAged):
                policy = policy.for_model(model)
            policies.append(policy)
    return policies


def trained_eval_settings(checkpoint: str | Path) -> dict[str, Any]:
    """evaluate() keywords that score a checkpoint as it was trained: the clip lengths, frame size, question
    style, offline question order and per-turn token cap of its train_log.json (none when it has no log, so
    evaluate's defaults apply)."""
    log = Path(checkpoint) / "train_log.json"
    trained = json.loads(log.read_text()).get("train_config", {}) if log.exists() else {}
    settings = {k: trained[k] for k in ("frame_size", "max_tokens_per_turn", "question_style", "offline_question_first")
                if trained.get(k) is not None}
    if trained.get("clip_seconds"):
        settings["clip_seconds"] = tuple(trained["clip_seconds"])
    return settings


def default_frame_size(processor: Any) -> int:
    """Render clips at the size the processor feeds the tower (Mllama tile side); 64 px for MOSS-VL."""
    return int(processor.config.image_size) if family_style(processor.family) == "llama3" else 64


def eval_clips(seeds: Iterable[int], frame_size: int, clip_seconds: tuple[int, int] = (8, 20),
               question_style: str = "plain") -> list[Clip]:
    return [make_clip(int(s), size=frame_size, min_seconds=clip_seconds[0], max_seconds=clip_seconds[1],
                      question_style=question_style) for s in seeds]


def stream_clip(model: Any, processor: Any, clip: Clip, *, max_tokens_per_turn: int = 64,
                policy: Any = None, cache_policy: Any = None) -> dict[int, str]:
    """{frame: text} the model says after each frame of `clip` (default policy: greedy ArgmaxPolicy); absent =
    silence. Speech before the first frame (the decision right after the prompt) counts as speech at frame 0.
    cache_policy: what the session forgets (one policy or a list, as `RealtimeSession` takes)."""
    session = RealtimeSession(model, processor, policy=policy if policy is not None else ArgmaxPolicy(),
                              cache_policy=cache_policy, max_tokens_per_turn=max_tokens_per_turn)
    said: dict[int, list[str]] = {}

    def run_round(frame: int) -> None:
        speaking, parts = False, []
        events = session.step()
        while True:
            for event in events:
                if isinstance(event, RoundStart):
                    speaking = True
                elif isinstance(event, TextDelta) and speaking:
                    parts.append(event.text)
                elif isinstance(event, RoundEnd):
                    speaking = False
            if session.waiting_for_input:  # the round is over
                break
            events = session.step()
        text = "".join(parts).strip()
        if text:
            said.setdefault(frame, []).append(text)

    try:
        run_round(0)  # prefill: the decision before any frame
        for k, frame in enumerate(clip.frames):
            if clip.question is not None and clip.question.asked_at == k:
                session.push_prompt(clip.question.text)
            session.push_frame(frame, clip.timestamps[k])
            run_round(k)
    finally:
        session.close()
    return {k: " ".join(parts) for k, parts in said.items()}


def answer_offline(model: Any, processor: Any, clip: Clip, question: str, *, max_new_tokens: int = 24,
                   question_first: bool = False) -> str:
    """Greedy answer to an offline question about the whole clip (the prompt of `offline_qa_sample`, the
    question before the video when `question_first`)."""
    text = offline_prompt(question, processor, question_first)
    inputs = processor(text, videos=[{"frames": clip.frames, "timestamps": list(clip.timestamps)}])
    inputs.pop("cross_attention_mask", None)  # training uses the default visibility (frames at or before a token)
    device = model.embed_tokens.weight.device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, prompt:].tolist()
    eos = set(model.config.tokens.eos_token_ids) | {model.config.tokens.pad_token_id}
    end = next((i for i, t in enumerate(new) if t in eos), len(new))
    return processor.decode(new[:end], skip_special_tokens=True).strip()


@torch.no_grad()
def evaluate(model: Any, processor: Any, seeds: Iterable[int] | None = None, *, frame_size: int | None = None,
             clip_seconds: tuple[int, int] = (8, 20), qa: bool | None = None, qa_per_clip: int = 2,
             max_tokens_per_turn: int = 64, max_clips: int | None = None, progress: bool = False,
             cache_policy: Any = None, question_style: str = "plain", offline_question_first: bool = False) -> Metrics:
    """Stream held-out clips (default: the first DEFAULT_EVAL_CLIPS of EVAL_SEEDS) and score them.

    qa: also answer up to `qa_per_clip` offline timestamp questions per clip (default: when the family's frames
    carry timestamps, i.e. MOSS-VL). max_clips caps how many of `seeds` are used. cache_policy: the sessions'
    cache policies (one or a list; offline QA reads the whole clip regardless). question_style: how replies spell
    the asked shape (synthetic.QUESTION_STYLES: the style the model was trained on). offline_question_first: ask
    the offline questions before the video (as the model was trained). The model is put in eval mode
    for the run and restored after."""
    seeds = list(EVAL_SEEDS[:DEFAULT_EVAL_CLIPS] if seeds is None else seeds)
    if max_clips is not None:
        seeds = seeds[:max_clips]
    frame_size = default_frame_size(processor) if frame_size is None else frame_size
    qa = family_style(processor.family) == "chatml" if qa is None else qa
    was_training = model.training
    model.eval()
    total = Metrics()
    try:
        clips = eval_clips(seeds, frame_size, clip_seconds, question_style)
        if progress:
            from tqdm.auto import tqdm
            clips = tqdm(clips, desc="eval", leave=False)
        for clip in clips:
            predicted = stream_clip(model, processor, clip, max_tokens_per_turn=max_tokens_per_turn,
                                    cache_policy=cache_policy)
            total = total + score_clip(clip.speech(), predicted, len(clip.frames), reply_frames=clip.reply_frames())
            if qa:
                asked = clip.qa[:qa_per_clip]
                pairs = [(answer_offline(model, processor, clip, p.question, question_first=offline_question_first),
                          p.answer) for p in asked]
                total = total + score_qa(pairs, [p.kind for p in asked])
    finally:
        model.train(was_training)
    logger.info("eval on %d clips: %s", total.clips, total.summary())
    return total
