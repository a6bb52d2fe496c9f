"""The output protocol of the threaded real-time APIs (markers on the output queue) and the mapping of the
cards' generate kwargs onto a RealtimeSession; see streaming.threads for the loops that use them."""

from __future__ import annotations

import logging
import numbers
import queue
import time
from collections.abc import Callable
from typing import Any, Literal

from ..generation.sampling import SamplingConfig
from .events import Decision, Event, FrameIngested, PromptAccepted, RoundStart, TextDelta
from .policies import ArgmaxPolicy
from .session import RealtimeSession

SILENCE = "<|silence|>"
ROUND_START = "<|round_start|>"
ROUND_END = "<|round_end|>"
ERROR_PREFIX = "[ERROR] "
HIDDEN_OUTPUT_TOKENS = ("<|response|>", "<|assistant|>", "<go>")  # spec moss-vl §6.3: never shown to users
UNPACED = 86400            # max_tokens_per_turn at or above this: no pacing (the cards' default)
REALTIME_SAMPLING = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}  # do_sample defaults, spec moss-vl §8.3 (9)
POLL_SECONDS = 0.02        # how often a waiting loop re-checks its stop flag and the other queue

logger = logging.getLogger(__name__)


class QueueMessageError(ValueError):
    """An `online_generate` input message is malformed; the message says which keys are accepted."""


def offer(out: Any, chunk: str, abandon: Callable[[], bool]) -> None:
    """Put `chunk` on `out`; on a full bounded queue, wait for room until `abandon()` (a consumer that stopped
    reading must never block the loop, its stop or its close)."""
    while True:
        try:
            out.put(chunk, timeout=POLL_SECONDS)
            return
        except queue.Full:
            if abandon():
                logger.warning("output queue full and nobody reads it: dropped %r", chunk)
                return


def deadline(seconds: float) -> Callable[[], bool]:
    """An `abandon` for `offer`: true once `seconds` have passed from now."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


def error_line(err: BaseException) -> str:
    return f"{ERROR_PREFIX}{type(err).__name__}: {err}"


class OutputProtocol:
    """Events of one session -> output chunks (see the module docstring). Stateful: one per loop."""

    def __init__(self, silence_id: int, round_start_on: Literal["prompt", "answer"],
                 opener: Literal["if_frame", "always"] = "if_frame") -> None:
        if round_start_on not in ("prompt", "answer"):
            raise ValueError(f"round_start_on must be 'prompt' or 'answer', got {round_start_on!r}")
        self.silence_id, self.round_start_on, self.opener = silence_id, round_start_on, opener
        self._opener_pending = False  # a prompt was consumed; the session may open the new turn with silence

    @classmethod
    def for_session(cls, session: RealtimeSession, round_start_on: str | None = None) -> "OutputProtocol":
        """MOSS-VL rules when the model has a `<|response|>` token, MOSS-Video-Preview rules otherwise."""
        rule = round_start_on or ("answer" if session.response_id is not None else "prompt")
        return cls(session.silence_id, rule, session.silence_after_prompt)

    def render(self, event: Event) -> list[str]:
        out: list[str] = []
        if self._opener_pending and isinstance(event, (FrameIngested, Decision)):
            self._opener_pending = False
            if isinstance(event, FrameIngested) or self.opener == "always":
                out.append(SILENCE)
        if isinstance(event, PromptAccepted) and self.round_start_on == "prompt":
            out.append(ROUND_START)
            self._opener_pending = True
        elif isinstance(event, RoundStart) and self.round_start_on == "answer":
            out.append(ROUND_START)
        elif isinstance(event, Decision) and event.token == self.silence_id:
            out.append(SILENCE)
        elif isinstance(event, TextDelta):
            text = event.text
            for hidden in HIDDEN_OUTPUT_TOKENS:
                text = text.replace(hidden, "")
            if text:
                out.append(text)
        return out

    def end(self) -> list[str]:
        return [ROUND_END]


def _pacing(max_tokens_per_turn: Any, max_new_tokens: Any) -> float | None:
    if None not in (max_tokens_per_turn, max_new_tokens) and max_tokens_per_turn != max_new_tokens:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and max_tokens_per_turn ({max_tokens_per_turn}) name "
                         f"the same tokens-per-second cap; give one of them")
    cap = max_new_tokens if max_tokens_per_turn is None else max_tokens_per_turn
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not cap > 0:
        raise ValueError(f"max_tokens_per_turn is a tokens-per-second cap and must be > 0 ({UNPACED} = no "
                         f"pacing), got {cap!r}")
    return None if cap >= UNPACED else float(cap)


def session_options(*, max_tokens_per_turn: float | None = None, max_new_tokens: float | None = None,
                    do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, policy: Any = None, cache_policy: Any = None) -> dict[str, Any]:
    """The cards' generate kwargs -> `RealtimeSession` kwargs (policy, cache_policy, max_tokens_per_second).
    Sampling (`do_sample=True`: temperature 0.7, top_k 20, top_p 0.8 unless given) builds an `ArgmaxPolicy`;
    a `policy=` chooses its own tokens, so it cannot be combined with sampling options."""
    sampling_given = do_sample is True or any(v is not None for v in (temperature, top_k, top_p))
    if policy is not None and sampling_given:
        raise ValueError("give either policy=... or sampling options (do_sample/temperature/top_k/top_p), not both")
    if policy is None:
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if do_sample is True:
            given = {k: REALTIME_SAMPLING[k] if v is None else v for k, v in given.items()}
        given = {k: v for k, v in given.items() if v is not None}
        policy = ArgmaxPolicy(SamplingConfig(do_sample=do_sample, **given))
    return {"policy": policy, "cache_policy": cache_policy,
            "max_tokens_per_second": _pacing(max_tokens_per_turn, max_new_tokens)}
