"""Speak/silence decision policies: given the next-token logits, choose the token for this step.

A policy is any callable `(logits [vocab], context: DecisionContext) -> token id`. The context carries the
family's control tokens so one policy works for both families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..generation.sampling import SamplingConfig, select_next_token


@dataclass(frozen=True)
class DecisionContext:
    silence_id: int
    response_id: int | None      # MOSS-VL opens an answer with <|response|>; None for MOSS-Video-Preview
    banned_ids: tuple[int, ...]  # never emitted in real time (<|...|>, placeholders)
    speaking: bool               # inside an answer
    step: int


def _masked(logits: torch.Tensor, ctx: DecisionContext) -> torch.Tensor:
    out = logits.clone()
    if ctx.banned_ids:
        out[list(ctx.banned_ids)] = float("-inf")
    return out


class ArgmaxPolicy:
    """The trained behaviour: the model's own choice (greedy, or sampled), with banned tokens masked."""

    def __init__(self, sampling: SamplingConfig | None = None, generator: torch.Generator | None = None) -> None:
        self.sampling = sampling or SamplingConfig()
        self.generator = generator

    def __call__(self, logits: torch.Tensor, ctx: DecisionContext) -> int:
        return int(select_next_token(_masked(logits, ctx)[None], self.sampling, self.generator)[0])


class SilenceThresholdPolicy(ArgmaxPolicy):
    """Stay silent only when p(silence) >= threshold; otherwise take the best non-silence token.
    (The MOSS remote code pins the threshold at 0.0, i.e. plain argmax; some upstream code used 0.6.)"""

    def __init__(self, threshold: float, sampling: SamplingConfig | None = None) -> None:
        super().__init__(sampling)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def __call__(self, logits: torch.Tensor, ctx: DecisionContext) -> int:
        masked = _masked(logits, ctx)
        if float(torch.softmax(masked.float(), -1)[ctx.silence_id]) >= self.threshold:
            return ctx.silence_id
        masked[ctx.silence_id] = float("-inf")
        return int(select_next_token(masked[None], self.sampling, self.generator)[0])


class AlwaysSpeakPolicy(ArgmaxPolicy):
    """Never choose silence (an upper bound on false alarms)."""

    def __call__(self, logits: torch.Tensor, ctx: DecisionContext) -> int:
        masked = _masked(logits, ctx)
        masked[ctx.silence_id] = float("-inf")
        return int(select_next_token(masked[None], self.sampling, self.generator)[0])


class TeacherForcedPolicy:
    """Replay a fixed token sequence (for streaming == offline checks and for probing the model's logits
    along a known transcript); after the script ends, stays silent."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.position = 0

    def __call__(self, logits: torch.Tensor, ctx: DecisionContext) -> int:
        if self.position >= len(self.tokens):
            return ctx.silence_id
        token = self.tokens[self.position]
        self.position += 1
        return token
