"""The query dicts of the model cards' offline APIs (spec moss-video-preview §6.2-6.3, moss-vl §8.1-8.2).

A query is a plain dict:

    prompt            str, conventionally "\\n" + text (MOSS-Video-Preview keeps the newline as the separator after
                      the media placeholders, MOSS-VL strips it: templates.query_content)
    images, videos    lists; an image is a PIL image, a path, bytes or a data: URL; a video is a path, or (MOSS-VL)
                      {"video_path": path, "segments": [[start, end], [t], ...]}, each segment its own video item
    messages          OpenAI-style turns instead of prompt + media: content parts {"type": "text" | "image" |
                      "image_url" | "video", ...}; image_url parts are normalised to image parts
    media_kwargs      video_preview: video_fps, video_minlen, video_maxlen (+ frame_extract_num_threads); moss_vl also
                      min_pixels, max_pixels, multi_image_max_pixels, video_max_pixels, min_frames, max_frames,
                      num_extract_threads, patch_size, temporal_patch_size, merge_size, image_mean, image_std
    generate_kwargs   max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, vision_chunked_length
    system_prompt, system_prompt_type, thinking_mode    the system turn (first turn only)
    reset_session / clear_history, persist_session      session history control
    stop_offline_generate, cancel_current_generate / stop_generation    control (queue worker only)

`parse_query` validates one dict into a `Query` (QueryError names the field, the expected type and the accepted
keys); `render_turn` builds the conversation and its rendered text; `build_turn` also runs the processor.

Media kwargs that follow-ups do not repeat are inherited: a user turn that carried media records its media_kwargs
in its message (key "media_kwargs"), and a later query without media_kwargs re-processes the history with the
most recent ones, so earlier videos keep the frames they were answered with.
"""

from __future__ import annotations

import base64
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from ..processing.templates import collect_media, offline_system_prompt, query_content

logger = logging.getLogger(__name__)


class QueryError(ValueError):
    """A query dict is malformed: unknown key, wrong type, or a prompt that does not fit the model."""


CONTENT_KEYS = ("prompt", "images", "videos", "messages")
QUERY_KEYS = (*CONTENT_KEYS, "media_kwargs", "generate_kwargs", "system_prompt", "system_prompt_type",
              "thinking_mode", "reset_session", "clear_history", "persist_session", "stop_offline_generate",
              "cancel_current_generate", "stop_generation")
CANCEL_KEYS = ("cancel_current_generate", "stop_generation")

# official offline defaults (spec moss-vl §8.1, [OFF-PY]); do_sample False makes temperature/top_k/top_p inert
DEFAULT_GENERATE = {"max_new_tokens": 256, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                    "repetition_penalty": 1.0, "do_sample": False, "vision_chunked_length": None}

_INT, _REAL, _BOOL, _SEQ3 = "an int", "a number", "a bool (True/False)", "a list of 3 numbers"
GENERATE_KWARG_TYPES = {"max_new_tokens": _INT, "temperature": _REAL, "top_k": _INT, "top_p": _REAL,
                        "repetition_penalty": _REAL, "do_sample": _BOOL, "vision_chunked_length": _INT}
_VIDEO_PREVIEW_MEDIA = {"video_fps": _REAL, "video_minlen": _INT, "video_maxlen": _INT,
                        "frame_extract_num_threads": _INT}
_MOSS_VL_MEDIA = {**_VIDEO_PREVIEW_MEDIA, "min_pixels": _INT, "max_pixels": _INT, "multi_image_max_pixels": _INT,
                  "video_max_pixels": _INT, "min_frames": _INT, "max_frames": _INT, "num_extract_threads": _INT,
                  "patch_size": _INT, "temporal_patch_size": _INT, "merge_size": _INT, "image_mean": _SEQ3,
                  "image_std": _SEQ3}
MEDIA_KWARG_TYPES = {"mllama": _VIDEO_PREVIEW_MEDIA, "video_preview": _VIDEO_PREVIEW_MEDIA,
                     "moss_vl": _MOSS_VL_MEDIA}
# passed to the processor under the same name; the others are checked (fixed by the checkpoint) or only affect speed
_PROCESSOR_MEDIA = ("video_fps", "video_minlen", "video_maxlen", "min_frames", "max_frames", "min_pixels",
                    "max_pixels")
_SPEED_ONLY = ("frame_extract_num_threads", "num_extract_threads", "multi_image_max_pixels")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _REAL:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(float(value)))
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(_type_ok(_REAL, v) for v in value))


def _check_kwargs(where: str, given: Any, types: dict[str, str], none_ok: tuple[str, ...] = ()) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise QueryError(f"{where} must be a dict, got {type(given).__name__} {given!r}")
    unknown = sorted(str(k) for k in given if k not in types)
    if unknown:
        raise QueryError(f"unknown {where} key(s) {unknown}; accepted: {', '.join(types)}")
    for name, value in given.items():
        if value is None and name in none_ok:
            continue
        if not _type_ok(types[name], value):
            raise QueryError(f"{where}[{name!r}] must be {types[name]}, got {type(value).__name__} {value!r}")
    return dict(given)


@dataclass(frozen=True)
class Query:
    """One validated query. `generate` holds every generate kwarg (defaults filled in)."""

    prompt: str | None = None
    images: tuple = ()
    videos: tuple = ()
    messages: tuple | None = None
    media_kwargs: dict = field(default_factory=dict)       # as given (validated)
    generate_kwargs: dict = field(default_factory=dict)    # as given (validated)
    generate: dict = field(default_factory=lambda: dict(DEFAULT_GENERATE))
    system_prompt: str | None = None
    system_prompt_type: str | None = None
    thinking_mode: str | None = None
    reset_session: bool = False
    persist_session: bool = True
    stop_offline_generate: bool = False
    cancel: bool = False

    @property
    def has_content(self) -> bool:
        return self.prompt is not None or self.messages is not None


def is_cancel(raw: Any) -> bool:
    """A queue item asking to cancel the generation in progress."""
    return isinstance(raw, dict) and any(raw.get(k) is True for k in CANCEL_KEYS)


def is_stop(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("stop_offline_generate") is True


def parse_query(raw: Any, family: str) -> Query:
    """Validate a query dict (see the module docstring) for a model of `family`."""
    if not isinstance(raw, dict):
        raise QueryError(f"a query must be a dict such as {{'prompt': '\\nDescribe the video.', 'videos': [path]}}, "
                         f"got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in QUERY_KEYS)
    if unknown:
        raise QueryError(f"unknown query key(s) {unknown}; accepted keys: {', '.join(QUERY_KEYS)}")
    for name in ("prompt", "system_prompt", "system_prompt_type", "thinking_mode"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise QueryError(f"query[{name!r}] must be a str, got {type(raw[name]).__name__} {raw[name]!r}")
    for name in ("reset_session", "clear_history", "persist_session", "stop_offline_generate", *CANCEL_KEYS):
        if name in raw and not isinstance(raw[name], bool):
            raise QueryError(f"query[{name!r}] must be a bool (True/False), got {type(raw[name]).__name__} "
                             f"{raw[name]!r}")
    for name in ("images", "videos", "messages"):
        if raw.get(name) is not None and not isinstance(raw[name], (list, tuple)):
            raise QueryError(f"query[{name!r}] must be a list, got {type(raw[name]).__name__}; wrap a single item "
                             f"in a list")
    if raw.get("messages") is not None and (raw.get("prompt") is not None or raw.get("images") or raw.get("videos")):
        raise QueryError("give either messages (media as content parts) or prompt + images + videos, not both")
    generate_kwargs = _check_kwargs("generate_kwargs", raw.get("generate_kwargs"), GENERATE_KWARG_TYPES,
                                    none_ok=("top_k", "top_p", "vision_chunked_length"))
    for name in ("max_new_tokens", "vision_chunked_length"):
        value = generate_kwargs.get(name)
        if value is not None and value < 1:
            raise QueryError(f"generate_kwargs[{name!r}] must be >= 1, got {value}")
    media_kwargs = _check_kwargs("media_kwargs", raw.get("media_kwargs"), MEDIA_KWARG_TYPES[family])
    messages = None
    if raw.get("messages") is not None:
        messages = tuple(normalize_message(m, k) for k, m in enumerate(raw["messages"]))
    videos = tuple(v for video in raw.get("videos") or () for v in _split_segments(video, "videos"))
    return Query(prompt=raw.get("prompt"), images=tuple(raw.get("images") or ()), videos=videos, messages=messages,
                 media_kwargs=media_kwargs, generate_kwargs=generate_kwargs,
                 generate={**DEFAULT_GENERATE, **generate_kwargs}, system_prompt=raw.get("system_prompt"),
                 system_prompt_type=raw.get("system_prompt_type"), thinking_mode=raw.get("thinking_mode"),
                 reset_session=bool(raw.get("reset_session") or raw.get("clear_history")),
                 persist_session=raw.get("persist_session", True),
                 stop_offline_generate=bool(raw.get("stop_offline_generate")), cancel=is_cancel(raw))


# ----------------------------------------------------------------------------- messages and media

def _split_segments(video: Any, where: str) -> list[Any]:
    """A video, or {"video_path", "segments"} split into one single-segment video item per segment."""
    if not isinstance(video, dict):
        if video is None or isinstance(video, (bool, numbers.Number)):
            raise QueryError(f"{where}: a video is a path or {{'video_path': path, 'segments': [...]}}, got "
                             f"{type(video).__name__} {video!r}")
        return [video]
    if "video_path" not in video:
        raise QueryError(f"{where}: a video dict needs 'video_path' (and optionally 'segments'), got keys "
                         f"{sorted(video)}")
    segments = video.get("segments")
    if segments is None:
        return [video["video_path"]]
    if not isinstance(segments, (list, tuple)) or not segments:
        raise QueryError(f"{where}: 'segments' must be a non-empty list of [start, end] or [t], got {segments!r}")
    out = []
    for seg in segments:
        if (not isinstance(seg, (list, tuple)) or len(seg) not in (1, 2)
                or not all(_type_ok(_REAL, t) and t >= 0 for t in seg)):
            raise QueryError(f"{where}: a segment is [start, end] or [t] in seconds (>= 0), got {seg!r}")
        out.append({"video_path": video["video_path"], "segments": [list(seg)]})
    return out


def normalize_message(message: Any, index: int = 0) -> dict[str, Any]:
    """One OpenAI-style message with image_url parts turned into image parts and segment videos split."""
    if not isinstance(message, dict) or "role" not in message:
        raise QueryError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r}")
    if message["role"] not in ("system", "user", "assistant"):
        raise QueryError(f"messages[{index}]['role'] = {message['role']!r}; expected system, user or assistant")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {"role": message["role"], "content": content or ""}
    if not isinstance(content, (list, tuple)):
        raise QueryError(f"messages[{index}]['content'] must be a str or a list of parts, got "
                         f"{type(content).__name__}")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in ("image", "image_url"):
            value = part.get("image") if part.get("image") is not None else part.get("image_url")
            if isinstance(value, dict):
                value = value.get("url")
            if value is None:
                raise QueryError(f"messages[{index}]: image part without an image: {part!r}")
            parts.append({"type": "image", "image": value})
        elif kind == "video":
            if part.get("video") is None:
                raise QueryError(f"messages[{index}]: video part without a video: {part!r}")
            parts.extend({"type": "video", "video": v} for v in _split_segments(part["video"], f"messages[{index}]"))
        else:
            raise QueryError(f"messages[{index}]: unknown content part {part!r}; parts are {{'type': 'text' | "
                             f"'image' | 'image_url' | 'video', ...}}")
    return {"role": message["role"], "content": parts}


def _image_source(image: Any) -> Any:
    """data: URLs -> bytes, file:// URLs -> paths; anything else as given (the image loader names bad input)."""
    if isinstance(image, str):
        if image.startswith("data:") and ";base64," in image:
            return base64.b64decode(image.split(";base64,", 1)[1])
        if image.startswith("file://"):
            return image[len("file://"):]
    return image


def _video_source(video: Any, processor: Any, settings: dict[str, Any]) -> Any:
    """Paths go to the processor as they are; a single-segment dict is decoded here (one video item)."""
    if not isinstance(video, dict):
        return video
    from ..processing import video as video_mod
    fps = settings.get("video_fps", processor.config.video_fps)
    (decoded,) = video_mod.decode_segments(video["video_path"], video["segments"], fps=fps)
    return decoded


# ----------------------------------------------------------------------------- turns

@dataclass
class Turn:
    """A rendered turn: the whole conversation so far (history + the new user turn), its text and media."""

    messages: list[dict[str, Any]]
    text: str
    images: list[Any]
    videos: list[Any]
    media_kwargs: dict[str, Any]     # the processor's media keywords for this conversation


def _has_video(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "video" for p in m["content"])
               for m in messages)


def _effective_media_kwargs(query: Query, history: list[dict[str, Any]]) -> dict[str, Any]:
    if query.media_kwargs:
        return dict(query.media_kwargs)
    for message in reversed(history):
        if message.get("media_kwargs"):
            return dict(message["media_kwargs"])
    return {}


def processor_media_kwargs(processor: Any, media_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Query media_kwargs -> the processor's keywords. Fixed geometry (patch/merge size, mean/std) must match the
    processor; `video_max_pixels` (a total T*H*W budget in the spec) becomes a per-frame cap of budget / max_frames,
    the share each frame gets when the frame budget is full; speed-only keys are accepted and ignored."""
    cfg = processor.config
    out = {k: v for k, v in media_kwargs.items() if k in _PROCESSOR_MEDIA}
    ignored = sorted(k for k in media_kwargs if k in _SPEED_ONLY)
    if ignored:
        logger.debug("media_kwargs %s only tune decoding speed / batch budgets here and are ignored", ignored)
    fixed = {"patch_size": cfg.patch_size, "merge_size": cfg.merge_size, "temporal_patch_size": 1}
    if processor.style == "chatml":
        fixed.update(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    for name, expected in fixed.items():
        if name in media_kwargs:
            given = tuple(media_kwargs[name]) if isinstance(media_kwargs[name], (list, tuple)) else media_kwargs[name]
            if given != expected:
                raise QueryError(f"media_kwargs[{name!r}] = {media_kwargs[name]!r}, but this checkpoint's processor "
                                 f"uses {expected!r}; it cannot change per query (drop the key)")
    if "video_max_pixels" in media_kwargs:
        max_frames = media_kwargs.get("max_frames", media_kwargs.get("video_maxlen", cfg.max_frames))
        out["video_max_pixels"] = max(cfg.video_min_pixels,
                                      min(cfg.video_max_pixels, media_kwargs["video_max_pixels"] // max(max_frames, 1)))
    return out


def render_turn(processor: Any, query: Query, history: list[dict[str, Any]] | None = None) -> Turn:
    """The conversation with the query's user turn appended, rendered with the family's chat template.

    A system turn is added only when the history is empty, the new messages have none, and the query gives
    system_prompt, system_prompt_type or thinking_mode (system_prompt wins; otherwise the offline prompt of
    thinking_mode x system_prompt_type, defaulting to "video" when the turn has a video).
    """
    if not query.has_content:
        raise QueryError("the query has neither 'prompt' nor 'messages'; e.g. {'prompt': '\\nDescribe the video.', "
                         "'videos': [path]}")
    history = [] if query.reset_session or history is None else list(history)
    media_kwargs = _effective_media_kwargs(query, history)
    if query.messages is not None:
        new = [dict(m) for m in query.messages]
    else:
        parts: list[dict[str, Any]] = [{"type": "image", "image": im} for im in query.images]
        parts += [{"type": "video", "video": v} for v in query.videos]
        text = query_content(query.prompt, family=processor.family)  # "\n"+prompt convention of the family
        new = [{"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}]
    if query.media_kwargs and any(isinstance(m.get("content"), list) for m in new):
        for m in new:
            if m["role"] == "user" and isinstance(m.get("content"), list):
                m["media_kwargs"] = dict(query.media_kwargs)
    wants_system = query.system_prompt is not None or query.system_prompt_type is not None or \
        query.thinking_mode is not None
    if not history and wants_system and not (new and new[0]["role"] == "system"):
        system = query.system_prompt
        if system is None:
            system = offline_system_prompt(query.thinking_mode, query.system_prompt_type, has_video=_has_video(new))
        new.insert(0, {"role": "system", "content": system})
    messages = history + new
    text = processor.apply_chat_template([{"role": m["role"], "content": m.get("content")} for m in messages],
                                         add_generation_prompt=True)
    images, videos = collect_media(messages)
    settings = processor_media_kwargs(processor, media_kwargs)
    return Turn(messages=messages, text=text, images=[_image_source(i) for i in images],
                videos=[_video_source(v, processor, settings) for v in videos], media_kwargs=settings)


def positions_used(processor: Any, inputs: Any) -> list[int]:
    """Text positions each batch item's input occupies: its real tokens, plus, for MOSS-VL, the extra positions
    every frame placeholder consumes (max(h, w) / merge more than one token, spec moss-vl §4.2)."""
    mask = inputs["attention_mask"].bool()
    used = mask.sum(1).tolist()
    grid = inputs.get("grid_thw")
    if processor.style != "chatml" or grid is None:
        return [int(n) for n in used]
    merge = processor.config.merge_size
    counts = inputs.get("media_nums_per_sample") or [grid.shape[0]]
    has_frames = ((inputs["input_ids"] == processor.image_token_id) & mask).any(1).tolist()
    start = 0
    for b, count in enumerate(counts):
        if has_frames[b]:  # an item without placeholders only carries the unreferenced blank image
            used[b] += sum(int(t) * (max(int(h), int(w)) // merge) for t, h, w in grid[start:start + count].tolist())
        start += count
    return [int(n) for n in used]


def check_context(length: int, max_context: int | None, what: str = "the prompt") -> None:
    """QueryError when a rendered input occupying `length` positions leaves no room in the model's context
    (text.max_position_embeddings)."""
    if max_context is None:
        return
    if length >= max_context:
        raise QueryError(f"{what} takes {length} positions (history, frames and template included) but the "
                         f"model's context is {max_context} (text.max_position_embeddings); shorten the prompt, use "
                         f"fewer frames (media_kwargs video_maxlen / max_frames) or start over with "
                         f"reset_session=True")


def build_turn(processor: Any, query: Query | dict, history: list[dict[str, Any]] | None = None, *,
               max_context: int | None = None) -> tuple[list[dict[str, Any]], Any]:
    """(messages, processor inputs) for one query on top of `history` (see `render_turn`). `query` may be a raw
    dict (validated with `parse_query`). QueryError when the input does not fit `max_context` tokens."""
    if not isinstance(query, Query):
        query = parse_query(query, processor.family)
    turn = render_turn(processor, query, history)
    inputs = processor(text=turn.text, images=turn.images or None, videos=turn.videos or None, padding_side="left",
                       **turn.media_kwargs)
    check_context(positions_used(processor, inputs)[0], max_context)
    return turn.messages, inputs


def answered(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The history after the assistant answered `text`."""
    return [*messages, {"role": "assistant", "content": text}]


__all__ = ["QueryError", "Query", "Turn", "QUERY_KEYS", "GENERATE_KWARG_TYPES", "MEDIA_KWARG_TYPES",
           "DEFAULT_GENERATE", "parse_query", "normalize_message", "render_turn", "build_turn", "check_context",
           "positions_used",
           "processor_media_kwargs", "answered", "is_cancel", "is_stop"]
