"""The one event stream every consumer (widgets, CLI, threaded queue APIs) reads from a RealtimeSession."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrameIngested:
    index: int          # frame number since the session started
    timestamp: float    # seconds from stream start
    n_tokens: int       # vision tokens the frame added to the cross-attention cache
    ms: float           # wall time of the step that ingested it (shared by frames of one step)


@dataclass(frozen=True)
class Decision:
    step: int
    token: int                                  # the token chosen at this step
    p_silence: float                            # probability of <|silence|> under the model (before the policy)
    logits_topk: tuple[tuple[int, float], ...]  # (token, logit) of the top-k candidates


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class RoundStart:
    step: int


@dataclass(frozen=True)
class RoundEnd:
    step: int
    interrupted: bool = False  # closed by a new prompt (barge-in) or the per-turn token cap


@dataclass(frozen=True)
class PromptAccepted:
    text: str


@dataclass(frozen=True)
class FrameDropped:
    timestamp: float
    reason: str = "queue full"  # or the cache policy that evicted it ("window", "pool")


@dataclass(frozen=True)
class CacheEvicted:
    kind: str        # "vision" or "text"
    policy: str
    count: int       # frames or tokens removed
    bytes_freed: int


Event = FrameIngested | Decision | TextDelta | RoundStart | RoundEnd | PromptAccepted | FrameDropped | CacheEvicted
