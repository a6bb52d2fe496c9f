"""`model.generate`: prefill once, then decode one token at a time reusing both caches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Union

import torch
from tqdm.auto import tqdm

from ..cache import StreamState
from .sampling import SamplingConfig, control_token_ids, select_next_token

if TYPE_CHECKING:
    import threading

    from ..model import MossModel

# a cancellation signal: a threading.Event (or anything with is_set()) or a no-argument callable -> bool
Stopping = Union["threading.Event", Callable[[], bool]]


def should_stop(stopping: Stopping | None) -> bool:
    if stopping is None:
        return False
    if hasattr(stopping, "is_set"):
        return bool(stopping.is_set())
    return bool(stopping())


@torch.no_grad()
def generate(model: "MossModel", input_ids: torch.Tensor, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, repetition_window: int | None = None,
             exempt_token_ids: Iterable[int] | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             attention_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, progress: bool = False,
             stopping: Stopping | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
             vision_chunked_length: int | None = None, **vision_inputs: Any) -> torch.Tensor:
    """input_ids [batch, prompt] (+ the family's vision inputs) -> [batch, prompt + new] token ids.

    Sequences that emit an end token are padded with `pad_token_id` afterwards; the loop stops early once
    every sequence has ended. Decode steps see every frame the last prompt token saw (the Mllama rule:
    its cross-attention mask row is repeated).

    repetition_penalty: HF semantics over the tokens generated here (the last `repetition_window` of them), never
    over `exempt_token_ids` (default: the control tokens of the model config); see generation.sampling.
    stopping: a threading.Event or a callable checked before every new token; when it fires the tokens chosen so
    far are returned (cancellation). on_token(next_ids [batch]) is called with every chosen token, in order
    (streaming). vision_chunked_length bounds how many frames the vision tower encodes at once (memory only).
    """
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, repetition_window=repetition_window)
    tokens = model.config.tokens
    eos = torch.tensor(list(tokens.eos_token_ids) if eos_token_id is None else
                       ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
                       dtype=torch.long, device=input_ids.device)
    pad = tokens.pad_token_id if pad_token_id is None else pad_token_id
    exempt = None
    if sampling.repetition_penalty != 1.0:
        ids = control_token_ids(model.config) if exempt_token_ids is None else exempt_token_ids
        exempt = torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long, device=input_ids.device)
    state = StreamState()
    out = model(input_ids, attention_mask=attention_mask, cross_attention_mask=cross_attention_mask,
                state=state, vision_chunked_length=vision_chunked_length, **vision_inputs)
    last_row = _last_mask_row(cross_attention_mask, model.config.vision.kind)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    generated = [input_ids]
    new_ids: list[torch.Tensor] = []  # [batch] each; what the repetition penalty looks at
    # no tqdm object unless asked for: even a disabled bar starts tqdm's global monitor thread
    steps = tqdm(range(max_new_tokens), desc="generate") if progress else range(max_new_tokens)
    for _ in steps:
        if should_stop(stopping):
            break
        seen = torch.stack(new_ids, dim=1) if exempt is not None and new_ids else None
        next_ids = select_next_token(out.logits[:, -1], sampling, generator, seen=seen, exempt=exempt)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        generated.append(next_ids[:, None])
        new_ids.append(next_ids)
        if on_token is not None:
            on_token(next_ids)
        finished |= torch.isin(next_ids, eos)
        if bool(finished.all()):
            break
        out = model(next_ids[:, None], cross_attention_mask=last_row, state=state)
    return torch.cat(generated, dim=1)


def _last_mask_row(cross_attention_mask: torch.Tensor | None, vision_kind: str) -> torch.Tensor | None:
    """The prompt's last cross-attention mask row, which every decode step reuses. Mllama layout
    [batch, text_pos, frame, tile] -> [batch, 1, frame, tile]; MOSS-VL [batch, 1, text_pos, frame] -> [batch, 1, 1,
    frame]."""
    if cross_attention_mask is None:
        return None
    if vision_kind == "moss_vit":
        return cross_attention_mask[:, :, -1:]
    return cross_attention_mask[:, -1:]
