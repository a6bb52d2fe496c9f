"""`model.generate`: prefill once, then decode one token at a time reusing both caches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..cache import StreamState
from .sampling import SamplingConfig, select_next_token

if TYPE_CHECKING:
    from ..model import MossModel


@torch.no_grad()
def generate(model: "MossModel", input_ids: torch.Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, progress: bool = False,
             **vision_inputs: Any) -> torch.Tensor:
    """input_ids [batch, prompt] (+ the family's vision inputs) -> [batch, prompt + new] token ids.

    Sequences that emit an end token are padded with `pad_token_id` afterwards; the loop stops early once
    every sequence has ended. Decode steps see every frame the last prompt token saw (the Mllama rule:
    its cross-attention mask row is repeated).
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = model.config.tokens
    eos = torch.tensor(list(tokens.eos_token_ids) if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       device=input_ids.device)
    pad = tokens.pad_token_id if pad_token_id is None else pad_token_id
    state = StreamState()
    out = model(input_ids, attention_mask=attention_mask, cross_attention_mask=cross_attention_mask,
                state=state, **vision_inputs)
    last_row = cross_attention_mask[:, -1:] if cross_attention_mask is not None else None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated = [input_ids]
    for _ in tqdm(range(max_new_tokens), disable=not progress, desc="generate"):
        next_ids = select_next_token(out.logits[:, -1], sampling, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        generated.append(next_ids[:, None])
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        out = model(next_ids[:, None], cross_attention_mask=last_row, state=state)
    return torch.cat(generated, dim=1)
