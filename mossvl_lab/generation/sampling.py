"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise SamplingError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")


def select_next_token(logits: torch.Tensor, cfg: SamplingConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the best token always stays
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
