"""Stream a clip through a RealtimeSession and record what a person wants to see: per frame, the decision,
p(silence), what was said, and where the deciding position looked among the frames so far."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.synthetic import Clip
from .interventions import frame_attention_mass
from .streaming.events import Decision, TextDelta
from .streaming.session import RealtimeSession
from .viz.timeline import StreamTrace

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "video-preview-tiny"


def trace_clip(model: Any, processor: Any, frames: np.ndarray, timestamps: list[float], *,
               question: tuple[int, str] | None = None, system_prompt: str | None = None,
               max_tokens_per_turn: int = 64) -> StreamTrace:
    """Push each frame (and the question with its frame), step until the model falls silent again, and
    record the trace. Cross-attention patterns are read through hooks (those layers run eagerly)."""
    layers = model.config.text.cross_attention_layers
    last_rows: dict[int, torch.Tensor] = {}

    def keep_last_row(pattern: torch.Tensor, hook) -> None:  # [batch, head, query_pos, vis]
        last_rows[int(hook.name.split(".")[1])] = pattern[0, :, -1].mean(0).detach()

    session = RealtimeSession(model, processor, system_prompt=system_prompt, max_tokens_per_turn=max_tokens_per_turn)
    trace = StreamTrace()
    with model.hooks([(f"blocks.{layer}.cross_attn.hook_pattern", keep_last_row) for layer in layers]):
        session.step()
        for k, (frame, ts) in enumerate(zip(frames, timestamps)):
            if question is not None and question[0] == k:
                session.push_prompt(question[1])
            session.push_frame(frame, ts)
            last_rows.clear()
            events = session.step()
            decision = next(e for e in events if isinstance(e, Decision))
            spoken = [e.text for e in events if isinstance(e, TextDelta)]
            steps = 0
            while not session.waiting_for_input and steps < max_tokens_per_turn + 1:
                spoken += [e.text for e in session.step() if isinstance(e, TextDelta)]
                steps += 1
            trace.frames.append(np.asarray(frame))
            trace.timestamps.append(float(ts))
            trace.p_silence.append(decision.p_silence)
            if "".join(spoken).strip():
                trace.speech[k] = "".join(spoken).strip()
            trace.attention.append(_frame_mass(last_rows, session) if last_rows else np.zeros(k + 1))
    session.close()
    return trace


def _frame_mass(last_rows: dict[int, torch.Tensor], session: RealtimeSession) -> np.ndarray:
    key_frame = session.stream.vision.key_frame  # [batch, vis]
    row = torch.stack(list(last_rows.values())).mean(0)  # [vis]
    mass = frame_attention_mass(row[None, None, None, :], key_frame, session.stream.vision.num_frames)
    return mass[0, 0, 0].float().numpy()


def trace_synthetic(model: Any, processor: Any, clip: Clip, **kw: Any) -> StreamTrace:
    question = (clip.question.asked_at, clip.question.text) if clip.question is not None else None
    return trace_clip(model, processor, clip.frames, list(clip.timestamps), question=question, **kw)
