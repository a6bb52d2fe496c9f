"""Training sequences laid out exactly as a RealtimeSession feeds them at inference.

Realtime stream (both families; spec video-preview §5.4, moss-vl §6.3):

    chat(system, user(initial prompt)) + assistant header      (no loss)
    <|silence|>                                                (decision before any frame: loss)
    for each frame k:
        [barge-in: close turn, user(question), assistant header, <|silence|> opener]  (no loss)
        frame k tokens (<|image|>, or MOSS-VL's <|vision_start|><|time_start|>X.X seconds<|time_end|>
                        <|image_pad|><|vision_end|>)                                   (no loss)
        decision: <|silence|>, or [<|response|>] answer text <|silence|>                (loss)

The session forwards a chosen token together with the next input, so this one sequence is what the
caches hold after streaming the clip; end-of-turn tokens and placeholders never carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.synthetic import Clip
from ..processing.templates import IMAGE, barge_in_text, family_style, moss_realtime_frame_text

IGNORE = -100


@dataclass
class TrainingSample:
    input_ids: torch.Tensor                 # [pos]
    labels: torch.Tensor                    # [pos]; IGNORE where no loss
    decisions: torch.Tensor | None = None   # [pos] bool: targets that decide whether to speak (None: none marked)
    replies: torch.Tensor | None = None     # [pos] bool: targets of replies to mid-stream questions (None: none)
    vision: dict[str, Any] = field(default_factory=dict)  # the processor's vision tensors for this sample alone
    frame_timestamps: list[float] = field(default_factory=list)


class _Builder:
    def __init__(self, processor: Any) -> None:
        self.tok = processor.tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.decisions: list[bool] = []
        self.replies: list[bool] = []

    def text(self, text: str, target: bool = False) -> None:
        self.tokens(self.tok.encode(text, add_special_tokens=False), target)

    def tokens(self, ids: list[int], target: bool = False, decisions: list[bool] | None = None,
               replies: list[bool] | None = None) -> None:
        self.ids += ids
        self.labels += ids if target else [IGNORE] * len(ids)
        self.decisions += decisions if decisions is not None else [False] * len(ids)
        self.replies += replies if replies is not None else [False] * len(ids)

    def speech(self, captions: list[str], replies: list[str], response: int | None, comma: int | None) -> None:
        """One frame's speech "caption, caption, reply" as targets. `decisions` mark speaking at all (the first
        token) and going on after each part; `replies` mark the reply parts from their leading ", " on."""
        said = self.tok.encode(", ".join(captions + replies), add_special_tokens=False)
        spoken_captions = self.tok.encode(", ".join(captions), add_special_tokens=False) if captions else []
        if said[:len(spoken_captions)] != spoken_captions:
            raise ValueError(f"the tokenizer merges across the caption/reply boundary of {captions + replies}; "
                             f"retrain it on synthetic.phrase_corpus() lines")
        opener = [response] if response is not None else []
        words = opener + said
        first_reply = len(opener) + len(spoken_captions) if replies else len(words)
        self.tokens(words, target=True, decisions=[i == 0 or w == comma for i, w in enumerate(words)],
                    replies=[i >= first_reply for i in range(len(words))])


def realtime_sample(clip: Clip, processor: Any, model_cfg: Any, *, system_prompt: str | None = None,
                    initial_prompt: str = "") -> TrainingSample:
    """The whole clip as one realtime training sequence. The system prompt defaults to the processor's real-time
    prompt and MOSS-VL frames carry their time text unless the processor's `frame_timestamps` is False (the
    timestamp ablation), exactly as a RealtimeSession with that processor feeds them."""
    family, tokens = model_cfg.family, model_cfg.tokens
    comma = _single_id(processor.tokenizer, ",")
    silence = tokens.silence_token_id
    if silence is None:
        raise ValueError("realtime training needs tokens.silence_token_id in the model config")
    chatml = family_style(family) == "chatml"
    response = tokens.response_token_id if chatml else None
    build = _Builder(processor)
    system = processor.default_realtime_system_prompt() if system_prompt is None else system_prompt
    build.text(processor.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": initial_prompt}]))
    build.tokens([silence], target=True, decisions=[True])
    speech = clip.speech_parts()
    asked: dict[int, list[str]] = {}
    for question in clip.questions:
        asked.setdefault(question.asked_at, []).append(question.text)
    for k, ts in enumerate(clip.timestamps):
        for question in asked.get(k, ()):
            build.text(barge_in_text(family, question))
            build.tokens([silence])  # the opener the session inserts when a frame follows the prompt
        if chatml:
            frame = moss_realtime_frame_text(ts, processor.config.frame_timestamps)
            build.text(frame.replace(IMAGE, "<|image_pad|>"))
        else:
            build.tokens([tokens.image_token_id])
        if k in speech:
            build.speech(*speech[k], response=response, comma=comma)
        build.tokens([silence], target=True, decisions=[True])  # the first token after a frame, or after speech
    vision = processor(IMAGE * len(clip.timestamps), images=list(clip.frames))
    keep = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "grid_thw")
    return TrainingSample(input_ids=torch.tensor(build.ids), labels=torch.tensor(build.labels),
                          decisions=torch.tensor(build.decisions), replies=torch.tensor(build.replies),
                          vision={k: v for k, v in vision.items() if k in keep},
                          frame_timestamps=list(clip.timestamps))


def _single_id(tok: Any, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def offline_prompt(question: str, processor: Any, question_first: bool = False) -> str:
    """The chat text of one offline question about a video: the video then the question, or (question_first)
    the question then the video. Asked first, the question is in context while every frame is read, so each
    frame's tokens can check locally whether they hold the answer ("is my time 12.0?", "did the green square
    appear here?") and the answer needs one lookup of the flagged frame, not a match of the question against
    every frame's time text and pictures. Both orders are the same chat template with its content reordered.

    Measured (session 9, one from-scratch run of the shipped moss-vl-tiny recipe with only this changed): asking
    first did NOT help; timestamp QA fell to 10/100 on validation clips from the question-after model's 24, so
    question-after stays the default and question_first is kept as an ablation."""
    parts = [{"type": "video"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": parts[::-1] if question_first else parts}])


def offline_qa_sample(clip: Clip, question: str, answer: str, processor: Any,
                      follow_ups: Sequence[tuple[str, str]] = (), question_first: bool = False) -> TrainingSample:
    """An offline turn: the clip as a video (MOSS-VL: with its timestamps) + a question -> the answer (the order of
    `offline_prompt`); each (question, answer) of `follow_ups` is one more user turn about the same video, asked
    after it, so one pass of the vision tower teaches several answers. Only answers (and their end-of-turn token)
    carry loss."""
    text = offline_prompt(question, processor, question_first)
    close = "<|im_end|>\n" if family_style(processor.family) == "chatml" else "<|eot_id|>"
    video = {"frames": clip.frames, "timestamps": list(clip.timestamps)}
    prompt = processor(text, videos=[video])
    ids, labels = [prompt["input_ids"][0]], [torch.full_like(prompt["input_ids"][0], IGNORE)]

    def add(text: str, target: bool) -> None:
        part = torch.tensor(processor.tokenizer.encode(text, add_special_tokens=False))
        ids.append(part)
        labels.append(part if target else torch.full_like(part, IGNORE))

    add(answer + close, target=True)
    for follow_up, reply in follow_ups:
        add(processor.apply_chat_template([{"role": "user", "content": follow_up}]), target=False)
        add(reply + close, target=True)
    keep = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "grid_thw")
    return TrainingSample(input_ids=torch.cat(ids), labels=torch.cat(labels),
                          vision={k: v for k, v in prompt.items() if k in keep},
                          frame_timestamps=list(clip.timestamps))
