"""RealtimeSession: a single-threaded, steppable real-time engine over one model and its caches.

Each `step()` drains pending input (prompts first, in arrival order, then frames sorted by timestamp),
runs ONE packed forward over [the token chosen last step + the drained segment] with the new frames'
pixels, and makes one decision on the last position's logits. A chosen `<|silence|>` is parked: it is
forwarded only with the next input segment, never twice (spec moss-vl §8.3, video-preview §6.4e), and
while parked `step()` does nothing until a frame or a prompt arrives. Frames go through the vision tower
once and are appended to the vision cache; nothing already cached is recomputed.

`push_frame` / `push_prompt` / `close` may be called from other threads; `step` belongs to one thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import StreamState
from ..processing.templates import (IMAGE, barge_in_text, family_style, moss_realtime_frame_text,
                                    realtime_system_prompt)
from .events import (Decision, Event, FrameDropped, FrameIngested, PromptAccepted, RoundEnd, RoundStart,
                     TextDelta)
from .inputs import FrameTimestampError, check_frame, check_timestamp
from .policies import ArgmaxPolicy, DecisionContext


TRANSCRIPT_CHARS = 100_000  # the transcript view keeps the newest text of very long streams


class SessionClosedError(RuntimeError):
    """The session was closed; create a new one to continue."""


@dataclass(frozen=True)
class SessionView:
    """A read-only snapshot for widgets: the live caches plus counters."""

    stream: StreamState
    step: int
    frames_ingested: int
    frames_dropped: int
    tokens_generated: int
    speaking: bool
    pending_frames: int
    pending_prompts: int
    transcript: str


def _default_system_prompt(processor: Any, family: str) -> str:
    chosen = getattr(processor, "default_realtime_system_prompt", None)
    return chosen() if chosen is not None else realtime_system_prompt(family)


class RealtimeSession:
    def __init__(self, model: Any, processor: Any, system_prompt: str | None = None, prompt: str | None = None,
                 policy: Any = None, cache_policy: Any = None, max_frames_queued: int = 256, *,
                 max_tokens_per_second: float | None = None, max_tokens_per_turn: int | None = None,
                 silence_after_prompt: str = "if_frame", topk: int = 5) -> None:
        """system_prompt: None = the processor's `default_realtime_system_prompt()` (a checkpoint may carry its
        own; otherwise the family's published real-time prompt); prompt: the initial user turn ("" if None).
        cache_policy: one policy or a list (streaming.cache_policies). silence_after_prompt: when a barge-in
        prompt opens the new assistant turn with the trained `<|silence|>` opener: "if_frame" (only when a
        frame follows in the same segment, the HF trace) or "always" (sglang-omni), spec moss-vl §12.6."""
        if max_frames_queued < 1:
            raise ValueError("max_frames_queued must be >= 1")
        if silence_after_prompt not in ("if_frame", "always"):
            raise ValueError("silence_after_prompt must be 'if_frame' or 'always'")
        self.model, self.processor = model, processor
        self.family = model.config.family
        self.policy = policy if policy is not None else ArgmaxPolicy()
        self.cache_policies = list(cache_policy) if isinstance(cache_policy, (list, tuple)) else \
            [] if cache_policy is None else [cache_policy]
        self.max_tokens_per_second, self.max_tokens_per_turn = max_tokens_per_second, max_tokens_per_turn
        self.silence_after_prompt, self.topk = silence_after_prompt, topk
        self._tok = processor.tokenizer
        self.silence_id = self._special("<|silence|>", model.config.tokens.silence_token_id)
        self.response_id = self._special("<|response|>", model.config.tokens.response_token_id, required=False)
        banned = [self._special("<|...|>", model.config.tokens.ellipsis_token_id, required=False),
                  model.config.tokens.image_token_id]
        self._banned = tuple(sorted({b for b in banned if b is not None and b < model.config.text.vocab_size}))
        system = _default_system_prompt(processor, self.family) if system_prompt is None else system_prompt
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt or ""}]
        self._initial_text = processor.apply_chat_template(messages, add_generation_prompt=True)
        self._frame_time_text = getattr(getattr(processor, "config", None), "frame_timestamps", True)  # MOSS-VL
        self.stream = StreamState()
        self._lock = threading.Condition(threading.RLock())
        self._frames: deque[tuple[float, Any]] = deque()
        self._prompts: deque[str] = deque()
        self._dropped: list[FrameDropped] = []
        self._max_frames = max_frames_queued
        self._last_pushed_ts: float | None = None
        self._closed = False
        self._started = False
        self._pending: list[int] = []     # the token chosen last step, forwarded with the next segment
        self._parked = False              # last choice was <|silence|>: wait for input
        self._speaking = False
        self._turn_tokens = 0
        self._logits: torch.Tensor | None = None
        self._decoder = processor.incremental_decoder(skip_special_tokens=True)
        self._step = 0
        self._frames_ingested = 0
        self._frames_dropped = 0
        self._tokens_generated = 0
        self._transcript: deque[str] = deque()
        self._transcript_chars = 0
        self._last_token_time = 0.0

    # ------------------------------------------------------------------ input (any thread)

    def push_frame(self, image: Any, timestamp: float) -> bool:
        """Queue a frame (PIL image, HxWx3 array or encoded bytes) at `timestamp` seconds.
        Returns True when the queue was full and the oldest pending frame was dropped."""
        frame, timestamp = check_frame(image), check_timestamp(timestamp)
        with self._lock:
            self._ensure_open()
            if self._last_pushed_ts is not None and timestamp < self._last_pushed_ts:
                raise FrameTimestampError(f"frame timestamp {timestamp:.3f}s is before the previous frame's "
                                          f"{self._last_pushed_ts:.3f}s; timestamps are seconds from the stream "
                                          f"start and must not go backwards")
            self._last_pushed_ts = timestamp
            dropped = len(self._frames) >= self._max_frames
            if dropped:  # drop the oldest pure frame; prompts live in their own queue and are never dropped
                old_ts, _ = self._frames.popleft()
                self._dropped.append(FrameDropped(timestamp=old_ts))
                self._frames_dropped += 1
            self._frames.append((timestamp, frame))
            self._lock.notify_all()
            return dropped

    def push_prompt_frame(self, prompt: str, image: Any, timestamp: float) -> bool:
        """A prompt and a frame that land in the same step: the new assistant turn opens with the trained
        `<|silence|>` and sees the frame. Nothing is queued if either is invalid."""
        if not isinstance(prompt, str):
            raise TypeError(f"push_prompt_frame expects a str prompt, got {type(prompt).__name__}")
        with self._lock:  # re-entrant: both pushes become one unit for the next drain
            dropped = self.push_frame(image, timestamp)
            self._prompts.append(prompt)
            return dropped

    def push_prompt(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"push_prompt expects a str, got {type(text).__name__}")
        with self._lock:
            self._ensure_open()
            self._prompts.append(text)
            self._lock.notify_all()

    def close(self) -> None:
        """Stop the session; returns at once from any state (a step in progress finishes its forward)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting_for_input(self) -> bool:
        """True once the last decision was <|silence|>: `step()` does nothing until a frame or prompt arrives."""
        return self._parked

    def _ensure_open(self) -> None:
        if self._closed:
            raise SessionClosedError("this RealtimeSession is closed; create a new one to continue")

    # ------------------------------------------------------------------ stepping (one thread)

    def step(self) -> list[Event]:
        """One decision step; returns its events (empty while parked with no input)."""
        self._ensure_open()
        if not self._started:
            return self._prefill()
        with self._lock:
            prompts = list(self._prompts)
            self._prompts.clear()
            frames = sorted(self._frames, key=lambda f: f[0])
            self._frames.clear()
            events: list[Event] = list(self._dropped)
            self._dropped.clear()
        if self._parked and not prompts and not frames:
            return events
        if not prompts and not frames and self.max_tokens_per_second:
            self._pace()
        started = time.perf_counter()
        ids, images, timestamps = list(self._pending), [], []
        if prompts and self._speaking:
            events += self._end_turn()
            events.append(RoundEnd(step=self._step, interrupted=True))
        for text in prompts:
            ids += self._encode(barge_in_text(self.family, text))
            events.append(PromptAccepted(text=text))
        if prompts and (frames or self.silence_after_prompt == "always"):
            ids.append(self.silence_id)  # the trained opener of an assistant turn
        for ts, image in frames:
            ids += self._frame_ids(ts)
            images.append(image)
            timestamps.append(ts)
        logits = self._forward(ids, images, timestamps)
        ms = (time.perf_counter() - started) * 1e3
        vision = self.stream.vision
        for i, ts in enumerate(timestamps):
            segment = vision.segments[len(vision.segments) - len(timestamps) + i]
            events.append(FrameIngested(index=self._frames_ingested, timestamp=ts,
                                        n_tokens=segment.token_span[1] - segment.token_span[0], ms=ms))
            self._frames_ingested += 1
        events += self._decide(logits)
        for policy in self.cache_policies:
            events += policy.apply(self.stream)
        return events

    def events(self, poll: float = 0.05) -> Iterator[Event]:
        """Step until closed, blocking (in `poll`-second waits) while parked with no input."""
        while not self._closed:
            try:
                produced = self.step()
            except SessionClosedError:
                return
            yield from produced
            if not produced and self._parked:
                with self._lock:
                    if not self._frames and not self._prompts and not self._closed:
                        self._lock.wait(timeout=poll)

    @property
    def state(self) -> SessionView:
        with self._lock:
            pending_frames, pending_prompts = len(self._frames), len(self._prompts)
        return SessionView(stream=self.stream, step=self._step, frames_ingested=self._frames_ingested,
                           frames_dropped=self._frames_dropped, tokens_generated=self._tokens_generated,
                           speaking=self._speaking, pending_frames=pending_frames, pending_prompts=pending_prompts,
                           transcript="".join(self._transcript))

    # ------------------------------------------------------------------ internals

    def _prefill(self) -> list[Event]:
        self._started = True
        logits = self._forward(self._encode(self._initial_text), [], [])
        return self._decide(logits)

    def _forward(self, ids: Sequence[int], images: list[Any], timestamps: list[float]) -> torch.Tensor:
        inputs: dict[str, Any] = {}
        if images:
            vision = self.processor(IMAGE * len(images), images=images)
            keep = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "grid_thw")
            inputs = {k: v for k, v in vision.items() if k in keep}
            inputs["frame_timestamps"] = list(timestamps)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.model.embed_tokens.weight.device)
        with torch.inference_mode():
            out = self.model(input_ids, state=self.stream, **inputs)
        return out.logits[0, -1].float()

    def _decide(self, logits: torch.Tensor) -> list[Event]:
        self._step += 1
        ctx = DecisionContext(silence_id=self.silence_id, response_id=self.response_id, banned_ids=self._banned,
                              speaking=self._speaking, step=self._step)
        token = int(self.policy(logits, ctx))
        if self.max_tokens_per_turn is not None and self._speaking and self._turn_tokens >= self.max_tokens_per_turn:
            token = self.silence_id  # the per-turn cap ends the answer
        probs = torch.softmax(logits, -1)
        top = torch.topk(logits, min(self.topk, logits.numel()))
        events: list[Event] = [Decision(step=self._step, token=token, p_silence=float(probs[self.silence_id]),
                                        logits_topk=tuple(zip(top.indices.tolist(), top.values.tolist())))]
        self._pending, self._parked = [token], token == self.silence_id
        if token == self.silence_id:
            if self._speaking:
                events += self._end_turn()
                events.append(RoundEnd(step=self._step))
            return events
        if not self._speaking:
            self._speaking, self._turn_tokens = True, 0
            events.append(RoundStart(step=self._step))
        self._turn_tokens += 1
        self._tokens_generated += 1
        self._last_token_time = time.monotonic()
        text = self._decoder.push(token)
        if text:
            self._add_text(text)
            events.append(TextDelta(text=text))
        return events

    def _end_turn(self) -> list[Event]:
        """Close the answer: whatever the decoder still holds becomes a last TextDelta."""
        rest = self._decoder.flush()
        self._speaking = False
        self._add_text(rest + "\n")
        return [TextDelta(text=rest)] if rest else []

    def _add_text(self, text: str) -> None:
        self._transcript.append(text)
        self._transcript_chars += len(text)
        while self._transcript_chars > TRANSCRIPT_CHARS and len(self._transcript) > 1:  # long streams stay bounded
            self._transcript_chars -= len(self._transcript.popleft())

    def _pace(self) -> None:
        wait = self._last_token_time + 1.0 / self.max_tokens_per_second - time.monotonic()
        if wait > 0:  # never delays frames or prompts: only called when no input is pending
            with self._lock:
                self._lock.wait(timeout=min(wait, 1.0))

    def _frame_ids(self, timestamp: float) -> list[int]:
        if family_style(self.family) == "chatml":  # <|vision_start|><|time_start|>X.X seconds<|time_end|>...
            text = moss_realtime_frame_text(timestamp, self._frame_time_text)
            return self._encode(text.replace(IMAGE, "<|image_pad|>"))
        return [self.model.config.tokens.image_token_id]

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def _special(self, token: str, configured: int | None, required: bool = True) -> int | None:
        found = self._tok.token_to_id(token)
        value = configured if configured is not None else found
        if value is None and required:
            raise ValueError(f"the tokenizer has no {token} token and the config names none; a real-time "
                             f"session needs it (see processing.tokenizer for the family's special tokens)")
        return value

