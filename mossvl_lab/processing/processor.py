"""`Processor`: chat template + tokenizer + image/video inputs -> the family's model inputs by their HF names.

    mllama / video_preview: input_ids, attention_mask [batch, pos]; pixel_values [batch, media, tile, 3, H, W];
        aspect_ratio_ids [batch, media]; aspect_ratio_mask [batch, media, tile];
        cross_attention_mask [batch, pos, media, tile] (1 = attend); frame_timestamps
    moss_vl: input_ids, attention_mask; pixel_values [patch, patch_dim]; grid_thw [media, 3];
        cross_attention_mask [batch, 1, pos, frame] (True = masked); media_nums_per_sample; frame_timestamps

Media are matched to placeholders in text order: the k-th `<|image|>` of the batch takes the k-th image, the
k-th `<|video|>` the k-th video (or per-sample nested lists). Pixels come from `mossvl_lab.processing.image`
and videos from `mossvl_lab.processing.video`, imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .masks import mllama_cross_attention_mask, moss_cross_attention_mask
from .templates import (IMAGE, TEMPLATES, VIDEO, PlaceholderCountError, check_timestamps, collect_media,
                        expand_moss_media, expand_video_placeholders, find_placeholders, realtime_system_prompt,
                        render_chat, split_media)
from .settings import PROCESSOR_CONFIG_FILE, ProcessingConfig
from .tokenizer import (REQUIRED_SPECIALS, ProcessingError, Tokenizer, as_id_list, build_tiny_tokenizer, family_style,
                        load_tokenizer, save_tokenizer)

__all__ = ["Processor", "ProcessingConfig", "ProcessorOutput", "ProcessorArgumentError", "MediaInputError",
           "TokenizerMismatchError", "check_tokenizer", "collect_media", "load_processor", "processor_for_model"]

class ProcessorArgumentError(TypeError):
    """An unknown keyword argument was passed to the processor; the message lists the accepted ones."""


class MediaInputError(ProcessingError):
    """An image or video input has the wrong type, shape or timestamps."""


class TokenizerMismatchError(ProcessingError):
    """The tokenizer's special-token ids differ from the model config's."""


# call-time keywords -> ProcessingConfig field (MOSS-Video-Preview's video_minlen/maxlen are aliases)
MEDIA_KWARGS = {"video_fps": "video_fps", "video_minlen": "min_frames", "video_maxlen": "max_frames",
                "min_frames": "min_frames", "max_frames": "max_frames", "min_pixels": "min_pixels",
                "max_pixels": "max_pixels", "video_min_pixels": "video_min_pixels",
                "video_max_pixels": "video_max_pixels", "max_image_tiles": "max_image_tiles",
                "image_size": "image_size"}
CALL_KWARGS = ("return_tensors", "padding", "padding_side", "add_special_tokens")


class ProcessorOutput(dict):
    """The model inputs (a dict: `model(**out)`), plus per-sample frame timestamps as an attribute."""

    sample_timestamps: list[list[float | None]]

    def to(self, device: Any) -> "ProcessorOutput":
        out = ProcessorOutput({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})
        out.sample_timestamps = self.sample_timestamps
        return out


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"mossvl_lab.processing.{name}")
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ProcessingError(f"mossvl_lab.processing.{name} is needed for media inputs but cannot be imported: "
                              f"{err}") from err


class Processor:
    """Tokenizer + template + media processing for one family."""

    def __init__(self, family: str, tokenizer: Tokenizer, config: ProcessingConfig | None = None):
        self.family = family
        self.style = family_style(family)
        self.tokenizer = tokenizer
        self.config = config or ProcessingConfig()
        self.template = TEMPLATES[self.style]
        self.image_token_id = tokenizer.image_token_id
        if self.image_token_id is None:
            raise TokenizerMismatchError(f"the tokenizer has no {tokenizer.roles['image_token']} token")

    # ------------------------------------------------------------------ text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            system_prompt: str | None = None, *, continue_final_message: bool = False) -> str:
        """Render messages (content: str or parts); image/video parts become `<|image|>` / `<|video|>`."""
        return render_chat(messages, self.template, add_generation_prompt=add_generation_prompt,
                           system_prompt=system_prompt, continue_final_message=continue_final_message)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        ids = as_id_list(ids)
        if ids and isinstance(ids[0], list):
            return [self.tokenizer.decode(row, skip_special_tokens) for row in ids]
        return self.tokenizer.decode(ids, skip_special_tokens)

    batch_decode = decode

    def incremental_decoder(self, skip_special_tokens: bool = False):
        return self.tokenizer.incremental_decoder(skip_special_tokens)

    # ------------------------------------------------------------------ call

    def __call__(self, text: str | list[str] | None = None, images: Any = None, videos: Any = None, *,
                 return_tensors: str = "pt", padding: bool | str = True, padding_side: str | None = None,
                 add_special_tokens: bool = False, video_fps: float | None = None, video_minlen: int | None = None,
                 video_maxlen: int | None = None, min_frames: int | None = None, max_frames: int | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, video_min_pixels: int | None = None,
                 video_max_pixels: int | None = None, max_image_tiles: int | None = None,
                 image_size: int | None = None, **unknown: Any) -> ProcessorOutput:
        """Tokenize `text` (placeholders expanded) and process `images` / `videos` into the family's inputs.

        Media keywords override `self.config` for this call (video_minlen / video_maxlen are MOSS-Video-Preview's
        names for min_frames / max_frames). Videos: paths (decoded with the family's sampling), DecodedVideo,
        {"frames", "timestamps"}, (frames, timestamps) or [T, H, W, 3] uint8 arrays.
        """
        if unknown:
            raise ProcessorArgumentError(f"Processor got unexpected keyword argument(s) {sorted(unknown)}; accepted: "
                                         f"text, images, videos, {', '.join(CALL_KWARGS)}, "
                                         f"{', '.join(sorted(MEDIA_KWARGS))}")
        if return_tensors != "pt":
            raise ProcessorArgumentError(f"return_tensors={return_tensors!r}; only 'pt' is supported")
        given = dict(video_fps=video_fps, video_minlen=video_minlen, video_maxlen=video_maxlen, min_frames=min_frames,
                     max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                     video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels,
                     max_image_tiles=max_image_tiles, image_size=image_size, padding_side=padding_side)
        settings = dataclasses.replace(self.config, **{MEDIA_KWARGS.get(k, k): v for k, v in given.items()
                                                       if v is not None})
        if text is None:
            raise ProcessorArgumentError("Processor needs text= (a string or a list of strings)")
        texts = [text] if isinstance(text, str) else list(text)
        slots = [find_placeholders(t) for t in texts]
        per_images = split_media(images, [s.count(IMAGE) for s in slots], "image")
        per_videos = split_media(videos, [s.count(VIDEO) for s in slots], "video")
        videos_loaded = [[self._load_video(v, settings) for v in vs] for vs in per_videos]
        # media of each sample in text order: ("image", source) or ("video", (frames, timestamps))
        media: list[list[tuple[str, Any]]] = []
        for sample_slots, ims, vids in zip(slots, per_images, videos_loaded):
            ims, vids = iter(ims), iter(vids)
            media.append([("image", next(ims)) if s == IMAGE else ("video", next(vids)) for s in sample_slots])
        expanded = [self._expand(t, m) for t, m in zip(texts, media)]
        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in expanded]
        input_ids, attention_mask = self._pad(ids, settings, padding)
        frames = [sum(1 if kind == "image" else len(v[1]) for kind, v in items) for items in media]
        _check_frame_tokens(input_ids, attention_mask, self.image_token_id, frames)
        if self.style == "chatml":
            out = self._moss_inputs(input_ids, attention_mask, media, settings)
        else:
            out = self._mllama_inputs(input_ids, attention_mask, media, settings)
        return out

    def _expand(self, text: str, media: list[tuple[str, Any]]) -> str:
        if self.style == "chatml":
            return expand_moss_media(text, [None if kind == "image" else v[1] for kind, v in media],
                                     with_time=self.config.frame_timestamps)
        return expand_video_placeholders(text, [len(v[1]) for kind, v in media if kind == "video"])

    def _pad(self, ids: list[list[int]], settings: ProcessingConfig, padding: Any) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(row) for row in ids)
        if not padding and any(len(row) != length for row in ids):
            raise ProcessingError("texts of different token lengths need padding=True")
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
        for b, row in enumerate(ids):
            span = slice(length - len(row), length) if settings.padding_side == "left" else slice(0, len(row))
            input_ids[b, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, span] = 1
        return input_ids, attention_mask

    def _load_video(self, video: Any, settings: ProcessingConfig) -> tuple[np.ndarray, list[float]]:
        """A path (decoded with the family's sampling), a DecodedVideo, {"frames", "timestamps"}, a
        (frames, timestamps) tuple or a bare [T, H, W, 3] uint8 array (timestamps k / video_fps)."""
        if isinstance(video, (str, os.PathLike)):
            mod = _module("video")
            if self.style == "chatml":
                sampling = mod.VideoSampling.moss_vl(video_fps=settings.video_fps, min_frames=settings.min_frames,
                                                     max_frames=settings.max_frames)
            else:
                sampling = mod.VideoSampling.video_preview(video_fps=settings.video_fps,
                                                           video_minlen=settings.min_frames,
                                                           video_maxlen=settings.max_frames)
            video = mod.decode_video(video, sampling)
        if hasattr(video, "frames"):  # DecodedVideo: sample_times are the prompt times (index / source fps)
            frames = video.frames
            timestamps = getattr(video, "sample_times", None) or getattr(video, "timestamps", None)
        elif isinstance(video, dict):
            frames, timestamps = video.get("frames"), video.get("timestamps")
        elif isinstance(video, tuple) and len(video) == 2:
            frames, timestamps = video
        else:
            frames, timestamps = video, None
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise MediaInputError(f"video frames must be a non-empty [T, H, W, 3] uint8 array; got shape "
                                  f"{frames.shape} dtype {frames.dtype}")
        if timestamps is None:
            timestamps = [k / settings.video_fps for k in range(len(frames))]
        timestamps = [float(t) for t in timestamps]
        if len(timestamps) != len(frames):
            raise MediaInputError(f"a video has {len(frames)} frames but {len(timestamps)} timestamps")
        check_timestamps(timestamps)
        return frames, timestamps

    # ------------------------------------------------------------------ family outputs

    def _mllama_inputs(self, input_ids, attention_mask, media, settings) -> ProcessorOutput:
        out = _output(input_ids, attention_mask, [[] for _ in media])
        if not any(media):
            return out
        image_mod = _module("image")
        pixels = [[image_mod.mllama_preprocess(img, size=settings.image_size, max_tiles=settings.max_image_tiles)
                   for kind, value in items for img in ([value] if kind == "image" else value[0])]  # frames are images
                  for items in media]
        batch, width = len(pixels), max(len(p) for p in pixels)
        tiles, size = settings.max_image_tiles, settings.image_size
        pixel_values = torch.zeros(batch, width, tiles, 3, size, size)
        ratio_ids = torch.zeros(batch, width, dtype=torch.long)
        ratio_mask = torch.zeros(batch, width, tiles, dtype=torch.long)
        ratio_mask[:, :, 0] = 1  # as transformers: padding media keep tile 0 "on" (their ratio id 0 marks them)
        for b, sample in enumerate(pixels):
            for i, p in enumerate(sample):
                values = torch.as_tensor(p.pixel_values, dtype=torch.float32)  # [tile, 3, size, size]
                pixel_values[b, i, :values.shape[0]] = values
                ratio_ids[b, i] = int(p.aspect_ratio_id)
                ratio_mask[b, i, :int(p.num_tiles)] = 1
        num_tiles = [[int(p.num_tiles) for p in sample] for sample in pixels]
        out.sample_timestamps = [_timestamps(items) for items in media]
        out.update(pixel_values=pixel_values, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
                   cross_attention_mask=mllama_cross_attention_mask(
                       input_ids, self.image_token_id, num_tiles=num_tiles, max_tiles=tiles,
                       attention_mask=attention_mask, rule=settings.cross_mask_rule, num_media=width),
                   frame_timestamps=_column_timestamps(out.sample_timestamps, width))
        return out

    def _moss_inputs(self, input_ids, attention_mask, media, settings) -> ProcessorOutput:
        out = _output(input_ids, attention_mask, [[] for _ in media])
        blank = settings.blank_image_for_text_only
        if not any(media) and not blank:
            return out
        image_mod = _module("image")
        sizes = dict(patch_size=settings.patch_size, merge_size=settings.merge_size)
        pieces, counts = [], []
        for items in media:
            for kind, value in items:
                if kind == "image":
                    pieces.append(image_mod.moss_patchify(value, min_pixels=settings.min_pixels,
                                                          max_pixels=settings.max_pixels, **sizes))
                else:
                    pieces.append(image_mod.moss_patchify_frames(value[0], min_pixels=settings.video_min_pixels,
                                                                 max_pixels=settings.video_max_pixels, **sizes))
            if blank and not items:  # spec moss-vl §2.2: a blank image no placeholder points at
                pieces.append(image_mod.blank_moss_image(**sizes))
            counts.append(len(items) or int(blank))
        out.sample_timestamps = [_timestamps(items) if items else [None] * int(blank) for items in media]
        frames = [len(ts) for ts in out.sample_timestamps]
        out.update(pixel_values=torch.cat([torch.as_tensor(p.pixel_values, dtype=torch.float32) for p in pieces]),
                   grid_thw=torch.tensor([[int(g) for g in p.grid_thw] for p in pieces], dtype=torch.long),
                   cross_attention_mask=moss_cross_attention_mask(
                       input_ids, self.image_token_id, frames_per_sample=frames, attention_mask=attention_mask,
                       num_frames=max(frames)),
                   media_nums_per_sample=counts, frame_timestamps=_column_timestamps(out.sample_timestamps,
                                                                                     max(frames)))
        return out

    # ------------------------------------------------------------------ files

    def default_realtime_system_prompt(self) -> str:
        """The system prompt a RealtimeSession uses when none is given: this processor's setting, else the
        family's published real-time prompt."""
        custom = self.config.realtime_system_prompt
        return realtime_system_prompt(self.family) if custom is None else custom

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """tokenizer.json, tokenizer_config.json and processor_config.json."""
        root = Path(path)
        save_tokenizer(self.tokenizer, root)
        data = {"processor_class": "mossvl_lab.processing.processor.Processor", "family": self.family,
                "settings": self.config.to_dict()}
        (root / PROCESSOR_CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"Processor(family={self.family!r}, vocab={len(self.tokenizer)}, config={self.config})"


def _output(input_ids: torch.Tensor, attention_mask: torch.Tensor, stamps: list) -> ProcessorOutput:
    out = ProcessorOutput(input_ids=input_ids, attention_mask=attention_mask)
    out.sample_timestamps = stamps
    return out


def _timestamps(items: list[tuple[str, Any]]) -> list[float | None]:
    """Per frame of a sample, in text order: None for an image, the video's timestamps for its frames."""
    return [t for kind, value in items for t in ([None] if kind == "image" else value[1])]


def _check_frame_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int,
                        frames: list[int]) -> None:
    found = ((input_ids == token_id) & attention_mask.bool()).sum(1).tolist()
    bad = [b for b, (f, n) in enumerate(zip(found, frames)) if f != n]
    if bad:
        raise PlaceholderCountError(f"after expansion sample(s) {bad} hold {[found[b] for b in bad]} frame token(s) "
                                    f"(id {token_id}) for {[frames[b] for b in bad]} frame(s); the text must not "
                                    f"contain raw frame tokens, only <|image|> / <|video|> placeholders")


def _column_timestamps(stamps: list[list[float | None]], width: int) -> list[float | None]:
    """One timestamp per frame column (the model's `frame_timestamps`): the samples' value where they agree."""
    columns = []
    for j in range(width):
        values = {ts[j] for ts in stamps if j < len(ts)}
        columns.append(values.pop() if len(values) == 1 else None)
    return columns


# ----------------------------------------------------------------------------- construction

def processor_for_model(cfg: Any, tokenizer: Tokenizer | Any | None = None,
                        config: ProcessingConfig | None = None) -> Processor:
    """A processor for a ModelConfig: its family's settings and a tiny tokenizer unless one is given."""
    if tokenizer is None:
        tokenizer = Tokenizer(build_tiny_tokenizer(cfg), cfg.family)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer, cfg.family)
    check_tokenizer(tokenizer, cfg)
    return Processor(cfg.family, tokenizer, config or ProcessingConfig.for_model(cfg))


def check_tokenizer(tokenizer: Tokenizer, cfg: Any) -> None:
    """The family's specials exist and sit at the ids `cfg.tokens` fixes (TokenizerMismatchError otherwise)."""
    tokenizer.require(REQUIRED_SPECIALS[cfg.family])
    t = cfg.tokens
    checks = {"bos_token_id": (tokenizer.bos_token_id, t.bos_token_id),
              "pad_token_id": (tokenizer.pad_token_id, t.pad_token_id),
              "image_token_id": (tokenizer.image_token_id, t.image_token_id),
              "silence_token_id": (tokenizer.token_to_id("<|silence|>"), t.silence_token_id),
              "response_token_id": (tokenizer.token_to_id("<|response|>"), t.response_token_id),
              "ellipsis_token_id": (tokenizer.token_to_id("<|...|>"), t.ellipsis_token_id)}
    bad = {k: v for k, v in checks.items() if v[1] is not None and v[0] != v[1]}
    if tokenizer.eos_token_id not in t.eos_token_ids:
        bad["eos_token_ids"] = (tokenizer.eos_token_id, t.eos_token_ids)
    if bad:
        raise TokenizerMismatchError("tokenizer and config disagree on " + ", ".join(
            f"{k} (tokenizer {a}, config {b})" for k, (a, b) in bad.items()))


def load_processor(path: str | os.PathLike) -> Processor:
    """Read a checkpoint dir: family from config.json (or processor_config.json), tokenizer files, settings.
    With a config.json the tokenizer's special ids are checked against the model's."""
    root = Path(path)
    data = json.loads((root / PROCESSOR_CONFIG_FILE).read_text()) if (root / PROCESSOR_CONFIG_FILE).is_file() else {}
    cfg = None
    if (root / "config.json").is_file():
        from ..checkpoints import load_config
        cfg = load_config(root)
    family = cfg.family if cfg is not None else data.get("family")
    if family is None:
        raise ProcessingError(f"{str(root)!r} has neither config.json nor a {PROCESSOR_CONFIG_FILE} naming the family")
    if data.get("family") not in (None, family):
        raise ProcessingError(f"{PROCESSOR_CONFIG_FILE} says family {data['family']!r} but config.json says {family!r}")
    settings = ProcessingConfig.from_dict(data["settings"]) if "settings" in data else None
    tokenizer = load_tokenizer(root, family)
    if cfg is not None:
        return processor_for_model(cfg, tokenizer, settings)
    return Processor(family, tokenizer, settings or ProcessingConfig())
