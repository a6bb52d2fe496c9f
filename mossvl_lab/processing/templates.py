"""Chat templates, system prompts and media placeholder expansion for both families.

Placeholders in text: `<|image|>` (one image) and `<|video|>` (one video). MOSS-Video-Preview expands a video
to one `<|image|>` token per frame and keeps `<|image|>` as the in-vocabulary frame token (spec
moss-video-preview §5). MOSS-VL replaces `<|image|>` by one `<|image_pad|>` and a video by
`<|vision_start|>` + per frame `<|time_start|>{ts:.1f} seconds<|time_end|><|image_pad|>` + `<|vision_end|>`
(spec moss-vl §6.2). Prompts are kept byte-exact; a test compares them with the spec text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .tokenizer import ProcessingError, family_style

IMAGE = "<|image|>"
VIDEO = "<|video|>"
IMAGE_PAD = "<|image_pad|>"
PLACEHOLDER_RE = re.compile(re.escape(IMAGE) + "|" + re.escape(VIDEO))


class PlaceholderCountError(ProcessingError):
    """The text has more or fewer `<|image|>` / `<|video|>` placeholders than media were given."""


class TimestampOrderError(ProcessingError):
    """Frame timestamps go backwards (or are negative / not finite)."""


class TemplateError(ProcessingError):
    """A chat message cannot be rendered (unknown role or content part)."""


class UnknownPromptTypeError(ProcessingError):
    """An unknown `thinking_mode` or `system_prompt_type`."""


# ----------------------------------------------------------------------------- system prompts

# spec moss-video-preview §5.3 (the real-time SFT data); the backquotes are part of the prompt
VIDEO_PREVIEW_REALTIME_SYSTEM_PROMPT = (
    "You are a helpful AI assistant. You perceive and understand the surrounding environment in real-time through "
    "the camera and interact with the user. Whether or not the user actively asks questions, you continuously "
    "observe and analyze visual information, maintaining awareness of the environment.\n\n"
    "Core Abilities:\n"
    "- Continuous Perception: Always observe and analyze the visual information captured by the camera in "
    "real-time. This perception does not stop even when there is no user interaction.\n"
    "- Observation-Based Answers: All answers must be based on visual observations, including both historical and "
    "real-time data. Do not make guesses without evidence from visual input.\n"
    "- Dynamic Adjustment: When you observe changes relevant to the user's question, promptly update and adjust "
    "your answers to ensure timeliness and accuracy.\n\n"
    "Interaction Rules:\n"
    "- Always base your answers on observed visual information.\n"
    "- If you notice significant changes related to the user's question, proactively and promptly update your "
    "answer.\n"
    "- When you are unable to answer or have finished answering, output `<|silence|>` directly.\n\n"
    "Your goal is to be the user's reliable \"eyes\", helping them understand and perceive the world around them."
)

# offline prompts, [thinking_mode][system_prompt_type] (spec moss-video-preview §5.3; deep_thinking: RECON, the
# MOSS-VL remote code's table that the spec cites as [V])
OFFLINE_SYSTEM_PROMPTS = {
    "no_thinking": {
        "video": "You are a helpful AI assistant specializing in video analysis. Respond to the user's request "
                 "based on the provided video content.",
        "text_image": "You are a helpful AI assistant. Respond to the user's request based on the provided text "
                      "and/or images.",
    },
    "deep_thinking": {
        "video": "A conversation between User and Assistant specializing in video analysis. The user makes a request, "
                 "and the assistant responds to it based on the provided video content. The assistant first thinks "
                 "about the reasoning process in the mind and then provides the user with the answer. The reasoning "
                 "process and answer are enclosed within <thinking></thinking> and <answer></answer> tags, "
                 "respectively, i.e., <thinking>reasoning process here</thinking><answer>answer here</answer>.",
        "text_image": "A conversation between User and Assistant. The user makes a request, and the assistant responds "
                      "to it based on the provided text and/or images. The assistant first thinks about the reasoning "
                      "process in the mind and then provides the user with the answer. The reasoning process and "
                      "answer are enclosed within <thinking></thinking> and <answer></answer> tags, respectively, "
                      "i.e., <thinking>reasoning process here</thinking><answer>answer here</answer>.",
    },
}
THINKING_MODE_ALIASES = {"no_thinking": "no_thinking", "default": "no_thinking", "standard": "no_thinking",
                         "deep_thinking": "deep_thinking", "thinking": "deep_thinking", "reasoning": "deep_thinking"}
PROMPT_TYPE_ALIASES = {"video": "video", "text_image": "text_image", "text-image": "text_image",
                       "image_text": "text_image", "image-text": "text_image", "text": "text_image",
                       "image": "text_image"}

# spec moss-vl §6.3 (byte-exact: the silence behaviour is conditioned on it)
MOSS_VL_REALTIME_SYSTEM_PROMPT = (
    "You are a helpful AI assistant specializing in real-time video analysis. The video streams to you frame by "
    "frame. At every frame, you decide independently whether to respond or stay silent \u2014 output `<|silence|>` "
    "when nothing relevant has happened, and respond when the visual content warrants it."
)
MOSS_VL_REALTIME_USER_PROMPT_PREFIX = (
    "As the video streams frame by frame, respond to this question whenever the visual evidence lets you answer or "
    "updates a previous answer; otherwise stay silent.\n\nQuestion: "
)
MOSS_VL_DEFAULT_QUESTION = "What happens in the video?"


def moss_vl_realtime_user_prompt(question: str = MOSS_VL_DEFAULT_QUESTION) -> str:
    """The MOSS-VL realtime CLI's default first user turn, around `question`."""
    return MOSS_VL_REALTIME_USER_PROMPT_PREFIX + question


def offline_system_prompt(thinking_mode: str | None = None, system_prompt_type: str | None = None, *,
                          has_video: bool = False) -> str:
    """The offline system prompt for a query's `thinking_mode` x `system_prompt_type` (aliases accepted;
    the type defaults to "video" when the query has a video, else "text_image")."""
    mode = THINKING_MODE_ALIASES.get(str(thinking_mode or "no_thinking").strip().lower())
    if mode is None:
        raise UnknownPromptTypeError(f"unknown thinking_mode {thinking_mode!r}; accepted: "
                                     f"{', '.join(sorted(THINKING_MODE_ALIASES))}")
    if system_prompt_type is None:
        kind = "video" if has_video else "text_image"
    else:
        key = re.sub(r"_+", "_", str(system_prompt_type).strip().lower().replace("/", "_").replace(" ", "_"))
        kind = PROMPT_TYPE_ALIASES.get(key)
        if kind is None:
            raise UnknownPromptTypeError(f"unknown system_prompt_type {system_prompt_type!r}; accepted: "
                                         f"{', '.join(sorted(PROMPT_TYPE_ALIASES))}")
    return OFFLINE_SYSTEM_PROMPTS[mode][kind]


def realtime_system_prompt(family: str) -> str:
    return MOSS_VL_REALTIME_SYSTEM_PROMPT if family_style(family) == "chatml" else VIDEO_PREVIEW_REALTIME_SYSTEM_PROMPT


def all_system_prompts() -> list[str]:
    prompts = [VIDEO_PREVIEW_REALTIME_SYSTEM_PROMPT, MOSS_VL_REALTIME_SYSTEM_PROMPT, moss_vl_realtime_user_prompt()]
    return prompts + [p for table in OFFLINE_SYSTEM_PROMPTS.values() for p in table.values()]


# ----------------------------------------------------------------------------- chat templates

@dataclass(frozen=True)
class ChatTemplate:
    """prefix + per message open.format(role) + content + close; the generation prompt opens an assistant turn."""

    name: str
    prefix: str
    open: str
    close: str

    def generation_prompt(self) -> str:
        return self.open.format(role="assistant")


# spec moss-video-preview §5.2 (`mllama`): no default system prompt
LLAMA3 = ChatTemplate("llama3", "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
# spec moss-vl §6.1: no BOS, no default system prompt (none is published, §12)
CHATML = ChatTemplate("chatml", "", "<|im_start|>{role}\n", "<|im_end|>\n")
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML}
ROLES = ("system", "user", "assistant")


def content_text(content: Any) -> str:
    """Message content (a str, or OpenAI-style parts) as text with `<|image|>` / `<|video|>` placeholders."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(part.get("text", ""))
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE)
        elif kind == "video":
            pieces.append(VIDEO)
        else:
            raise TemplateError(f"unknown content part {part!r}; parts are {{'type': 'text' | 'image' | 'image_url' "
                                f"| 'video', ...}}")
    return "".join(pieces)


def render_chat(messages: Sequence[dict[str, Any]], template: ChatTemplate, *, add_generation_prompt: bool = True,
                system_prompt: str | None = None, continue_final_message: bool = False) -> str:
    """Render messages; `system_prompt` is prepended as a system turn unless the messages start with one.
    `continue_final_message` leaves the last (assistant) turn open, as realtime training data does."""
    messages = list(messages)
    if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    out = [template.prefix]
    for k, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise TemplateError(f"message {k} has role {role!r}; expected one of {ROLES}")
        out.append(template.open.format(role=role) + content_text(message.get("content")))
        if not (continue_final_message and k == len(messages) - 1):
            out.append(template.close)
    if add_generation_prompt and not continue_final_message:
        out.append(template.generation_prompt())
    return "".join(out)


def query_content(prompt: str, num_images: int = 0, num_videos: int = 0, *, family: str = "video_preview") -> str:
    """A queue-API query (`prompt`, conventionally "\\n" + text, plus media) as one user turn: placeholders
    first, then the prompt. MOSS-Video-Preview keeps the leading newline as the separator; MOSS-VL strips it."""
    if family_style(family) == "chatml":
        prompt = prompt[1:] if prompt.startswith("\n") else prompt
    return IMAGE * num_images + VIDEO * num_videos + prompt


def barge_in_text(family: str, prompt: str) -> str:
    """Text appended mid-stream when a new user prompt arrives: close the assistant turn, add the user turn,
    open a new assistant turn (spec moss-video-preview §6.4 f, moss-vl §6.3)."""
    template = TEMPLATES[family_style(family)]
    return (template.close + template.open.format(role="user") + prompt + template.close
            + template.generation_prompt())


def moss_realtime_frame_text(timestamp: float, with_time: bool = True) -> str:
    """One realtime MOSS-VL frame (spec moss-vl §6.3), with the `<|image|>` placeholder still in it.
    with_time=False leaves out the timestamp text (the timestamp ablation)."""
    check_timestamps([timestamp])
    time_text = f"<|time_start|>{timestamp:.1f} seconds<|time_end|>" if with_time else ""
    return f"<|vision_start|>{time_text}{IMAGE}<|vision_end|>"


def collect_media(messages: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Images and videos carried by OpenAI-style content parts ({"type": "image", "image": ...}), in text order."""
    images, videos = [], []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            value = part.get("image") if part.get("image") is not None else part.get("image_url")
            if kind in ("image", "image_url") and value is not None:
                images.append(value["url"] if isinstance(value, dict) and "url" in value else value)
            elif kind == "video" and part.get("video") is not None:
                videos.append(part["video"])
    return images, videos


# ----------------------------------------------------------------------------- placeholder expansion

def find_placeholders(text: str) -> list[str]:
    """The `<|image|>` / `<|video|>` placeholders of `text`, in order."""
    return PLACEHOLDER_RE.findall(text)


def check_timestamps(timestamps: Sequence[float], what: str = "frame timestamps") -> None:
    previous = -math.inf
    for k, ts in enumerate(timestamps):
        ts = float(ts)
        if not math.isfinite(ts) or ts < 0:
            raise TimestampOrderError(f"{what}[{k}] = {ts!r}; timestamps are seconds from the start (finite, >= 0)")
        if ts < previous:
            raise TimestampOrderError(f"{what} go backwards at index {k}: {previous} then {ts}; frames must be given "
                                      f"in non-decreasing time order")
        previous = ts


def _count_error(text_counts: tuple[int, int], given: tuple[int, int], hint: str) -> PlaceholderCountError:
    (ti, tv), (gi, gv) = text_counts, given
    what = ("more placeholders than media" if ti + tv > gi + gv else "fewer placeholders than media"
            if ti + tv < gi + gv else "the image/video kinds do not match")
    return PlaceholderCountError(f"the text has {ti} {IMAGE} and {tv} {VIDEO} placeholder(s) but {gi} image(s) and "
                                 f"{gv} video(s) were given ({what}); {hint}")


def expand_video_placeholders(text: str, frame_counts: Sequence[int]) -> str:
    """MOSS-Video-Preview: the k-th `<|video|>` becomes `frame_counts[k]` `<|image|>` tokens (no timestamps)."""
    parts = text.split(VIDEO)
    if len(parts) - 1 != len(frame_counts):
        raise _count_error((text.count(IMAGE), len(parts) - 1), (text.count(IMAGE), len(frame_counts)),
                           "give one frame count per <|video|>")
    bad = [n for n in frame_counts if int(n) < 1]
    if bad:
        raise PlaceholderCountError(f"frame_counts {list(frame_counts)} has videos with no frames; each needs >= 1")
    out = [parts[0]]
    for n, rest in zip(frame_counts, parts[1:]):
        out.append(IMAGE * int(n) + rest)
    return "".join(out)


def moss_video_text(timestamps: Sequence[float], with_time: bool = True) -> str:
    """One MOSS-VL video unit: vision_start, per frame the timestamp (unless with_time=False) then its image_pad,
    vision_end."""
    if len(timestamps) == 0:
        raise PlaceholderCountError("a video needs at least one frame")
    check_timestamps(timestamps)
    frames = "".join((f"<|time_start|>{float(ts):.1f} seconds<|time_end|>" if with_time else "") + IMAGE_PAD
                     for ts in timestamps)
    return f"<|vision_start|>{frames}<|vision_end|>"


def expand_moss_media(text: str, media: Sequence[Sequence[float] | None], with_time: bool = True) -> str:
    """MOSS-VL: replace the placeholders of `text` in order. `media` has one entry per placeholder in text
    order: None for an image (-> one `<|image_pad|>`), the frame timestamps (seconds) for a video (written into
    the text unless with_time=False)."""
    slots = find_placeholders(text)
    is_video = [m is not None for m in media]
    counts = (slots.count(IMAGE), slots.count(VIDEO))
    given = (is_video.count(False), is_video.count(True))
    if counts != given:
        raise _count_error(counts, given, "give one entry per placeholder (None for an image, timestamps for a video)")
    for k, (slot, video) in enumerate(zip(slots, is_video)):
        if (slot == VIDEO) != video:
            raise PlaceholderCountError(f"placeholder {k} is {slot} but media entry {k} is "
                                        f"{'a video' if video else 'an image'}; list media in text order")
    pieces = iter(IMAGE_PAD if m is None else moss_video_text(m, with_time) for m in media)
    return PLACEHOLDER_RE.sub(lambda _: next(pieces), text)


def split_media(items: Any, counts: list[int], kind: str) -> list[list[Any]]:
    """Media of one kind per sample, from per-sample nested lists or a flat list consumed in text order across the
    batch; `counts` are the samples' placeholder counts (PlaceholderCountError when they disagree)."""
    items = [] if items is None else items if isinstance(items, list) else [items]
    nested = bool(items) and all(isinstance(x, list) for x in items)
    if nested and len(items) != len(counts):
        raise PlaceholderCountError(f"{len(items)} per-sample {kind} lists for {len(counts)} texts")
    given = [len(x) for x in items] if nested else None
    total = sum(given) if nested else len(items)
    if (given != counts) if nested else (total != sum(counts)):
        what = (f"more placeholders than {kind}s" if sum(counts) > total else f"fewer placeholders than {kind}s"
                if sum(counts) < total else "the per-sample counts differ")
        raise PlaceholderCountError(f"the text has {sum(counts)} <|{kind}|> placeholder(s) (per sample {counts}) but "
                                    f"{total} {kind}(s) were given{f' (per sample {given})' if nested else ''} "
                                    f"({what}); put one <|{kind}|> in the text per {kind}")
    if nested:
        return items
    starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
    return [items[a:b] for a, b in zip(starts[:-1], starts[1:])]
