"""Choosing the next token from logits: repetition penalty, greedy, temperature, top-k, top-p.

Order (as transformers' logits processors): repetition penalty on the raw logits, then greedy argmax, or
temperature -> top-k -> top-p -> multinomial when sampling.

Repetition penalty (HF semantics: a previously seen token's logit is divided by the penalty when positive and
multiplied by it when negative) with two deliberate differences, because a stock penalty makes realtime MOSS
models hallucinate rounds (spec moss-vl §8.3 item 9):

* control tokens are never penalised: the family's silence / response / ellipsis tokens, frame placeholders
  (`<|image|>`, `<|image_pad|>`), timestamp wrappers, turn markers and every other special token of the
  tokenizer (`control_token_ids`);
* "seen" means tokens *generated* in this call (optionally only the last `repetition_window` of them), never the
  prompt. The prompt holds the timestamp text of every frame (`<|time_start|>12.0 seconds<|time_end|>`); those
  digits are ordinary text tokens, and penalising them would push the model off numbers it must write.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


class SamplingError(ValueError):
    """A sampling parameter is out of range or of the wrong type."""


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    repetition_window: int | None = None  # penalise only the last N generated tokens (None: all generated)

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise SamplingError(f"do_sample must be True or False, got {self.do_sample!r}")
        if _real("temperature", self.temperature) <= 0:
            raise SamplingError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise SamplingError(f"top_k must be an int >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None and not 0 < _real("top_p", self.top_p) <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if _real("repetition_penalty", self.repetition_penalty) <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.repetition_window is not None and (isinstance(self.repetition_window, bool)
                                                   or not isinstance(self.repetition_window, int)
                                                   or self.repetition_window < 1):
            raise SamplingError(f"repetition_window must be an int >= 1 (or None), got {self.repetition_window!r}")


def control_token_ids(cfg: Any, tokenizer: Any = None) -> frozenset[int]:
    """Ids a repetition penalty must never touch: the model config's special ids (`cfg` is a ModelConfig or its
    TokenConfig: image/placeholder, bos, eos, pad, silence, response, ellipsis) plus every special token of
    `tokenizer` (a Tokenizer, a Processor holding one, or a `tokenizers.Tokenizer`), which covers timestamp
    wrappers, vision_start/end, image_pad/video_pad and the turn markers."""
    tokens = getattr(cfg, "tokens", cfg)
    ids: set[int] = set()
    if tokens is not None:
        for name in ("image_token_id", "bos_token_id", "pad_token_id", "silence_token_id", "response_token_id",
                     "ellipsis_token_id"):
            value = getattr(tokens, name, None)
            if value is not None:
                ids.add(int(value))
        ids.update(int(i) for i in getattr(tokens, "eos_token_ids", ()) or ())
    tok = getattr(tokenizer, "tokenizer", tokenizer)   # Processor -> Tokenizer
    backend = getattr(tok, "backend", tok)             # Tokenizer -> tokenizers.Tokenizer
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        ids.update(int(i) for i, added in backend.get_added_tokens_decoder().items() if added.special)
    return frozenset(ids)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float,
                             exempt: Iterable[int] | torch.Tensor | None = None) -> torch.Tensor:
    """logits [batch, vocab]; seen [batch, n] token ids (negative = none) -> penalised logits [batch, vocab].

    Every distinct id of a row's `seen` (except `exempt` ids) gets logit / penalty if positive, logit * penalty
    otherwise; one occurrence or ten penalise the same (HF). Returns a new tensor; `logits` is untouched.
    """
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    seen = seen.to(logits.device).long()
    in_range = (seen >= 0) & (seen < vocab)
    counts = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
    counts.scatter_add_(1, seen.clamp(0, vocab - 1), in_range.long())  # add, so out-of-range ids never un-mark
    hit = counts > 0
    if exempt is not None:
        exempt_ids = torch.as_tensor(sorted(exempt) if not isinstance(exempt, torch.Tensor) else exempt,
                                     dtype=torch.long, device=logits.device)
        exempt_ids = exempt_ids[(exempt_ids >= 0) & (exempt_ids < vocab)]
        hit[:, exempt_ids] = False
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(hit, penalised, logits)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampling scores: logits / temperature with everything outside top-k and top-p set to -inf.
    logits [batch, vocab] -> float32 [batch, vocab]."""
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the best token always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def select_next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None, *,
                      seen: torch.Tensor | None = None,
                      exempt: Iterable[int] | torch.Tensor | None = None) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]. `seen` [batch, n]: ids the repetition penalty looks at
    (callers pass the generated ones, see the module docstring); `exempt`: ids it never penalises."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        if cfg.repetition_window is not None:
            seen = seen[:, -cfg.repetition_window:]
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty, exempt)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
