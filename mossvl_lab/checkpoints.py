"""Checkpoint I/O in the Hugging Face hub layout: safetensors (single file or sharded), key maps, manifests.

A checkpoint directory holds
    config.json                       HF fields (`hf_config.to_hf_dict`) + our exact config under "mossvl_lab"
    model.safetensors                 every tensor, or when sharded:
    model-00001-of-0000N.safetensors  + model.safetensors.index.json
                                      {"metadata": {"total_size": bytes}, "weight_map": {hub key: file name}}
Keys on disk are hub names (`language_model.model.layers.3.cross_attn.q_proj.weight`); our module names differ
only by a prefix, so each family's key map is a small table of (ours, hub) prefix pairs, longest match first.
Tied parameters (lm_head.weight is embed_tokens.weight) are stored once, under the first name, as transformers does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .hf_config import UnsupportedModelTypeError, from_hf_dict, to_hf_dict

if TYPE_CHECKING:
    from .model import MossModel

__all__ = ["CheckpointNotFoundError", "CheckpointMismatchError", "UnsupportedModelTypeError", "UnmappedKeyError",
           "KEY_MAPS", "to_hub_key", "from_hub_key", "checkpoint_manifest", "save_model", "load_model",
           "load_config", "read_hub_tensors"]

log = logging.getLogger(__name__)

CONFIG_NAME, SINGLE_NAME, INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# (ours, hub) prefix pairs per family. A prefix ending in "." rewrites a subtree; one without rewrites that exact
# name (MOSS-VL's `model.separator_token`). The vision projector pair must win over the generic vision pair.
_MLLAMA_KEYS = (
    ("vision.multi_modal_projector.", "multi_modal_projector."),
    ("vision.", "vision_model."),
    ("embed_tokens.", "language_model.model.embed_tokens."),
    ("blocks.", "language_model.model.layers."),
    ("norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)
# MOSS-VL (spec moss-vl §7.2): copied 1:1 by the published loaders; the separator lives on our vision tower
_MOSS_VL_KEYS = (
    ("vision.separator_token", "model.separator_token"),
    ("vision.", "model.visual."),
    ("embed_tokens.", "model.language_model.embed_tokens."),
    ("blocks.", "model.language_model.layers."),
    ("norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
KEY_MAPS: dict[str, tuple[tuple[str, str], ...]] = {"mllama": _MLLAMA_KEYS, "video_preview": _MLLAMA_KEYS,
                                                     "moss_vl": _MOSS_VL_KEYS}


class CheckpointNotFoundError(FileNotFoundError):
    """The path is not a checkpoint directory (no config.json, or no safetensors weights)."""


class UnmappedKeyError(KeyError):
    """A name matches no prefix of the family's key map."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model: every missing, unexpected and mis-shaped key, at once.

    Attributes: `missing` / `unexpected` (sorted hub keys), `mismatched` {hub key: (expected shape, found shape)}.
    """

    def __init__(self, missing: list[str], unexpected: list[str],
                 mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], source: str = "the checkpoint",
                 limit: int = 20) -> None:
        self.missing, self.unexpected = sorted(missing, key=_natural), sorted(unexpected, key=_natural)
        self.mismatched = dict(sorted(mismatched.items(), key=lambda kv: _natural(kv[0])))
        parts = [f"{source} does not fit the model built from its config "
                 f"({len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} mis-shaped keys):"]
        sections = (("missing (in the model, not in the checkpoint)", {k: "" for k in self.missing}),
                    ("unexpected (in the checkpoint, not in the model)", {k: "" for k in self.unexpected}),
                    ("mis-shaped (expected -> found)",
                     {k: f"  expected {tuple(e)}, found {tuple(f)}" for k, (e, f) in self.mismatched.items()}))
        for title, items in sections:
            if items:
                parts.append(f"{len(items)} {title}:")
                parts.extend(f"  {line}" for line in _summarize(items, limit))
        parts.append("Fix: check that config.json describes these weights (family, sizes, tie_word_embeddings, "
                     "cross_attention_layers), or build the model from the preset the weights were trained with.")
        super().__init__("\n".join(parts))


def _natural(key: str) -> list[Any]:
    """Orders layers.2 before layers.10 (split() alternates text and digits, so element types line up)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _summarize(items: dict[str, str], limit: int) -> list[str]:
    """One line per key pattern (layer indices collapsed to `*`) with its indices; at most `limit` lines + a count.

    A wrong config on an 11B checkpoint mis-shapes hundreds of keys; grouping keeps that to a screen."""
    index = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a whole dotted component that is a number
    groups: dict[tuple[str, str], list[str]] = {}
    for key, note in items.items():
        groups.setdefault((index.sub("*", key), note), []).append(key)
    lines = [keys[0] + note if len(keys) == 1 else
             f"{pattern}{note}  [{len(keys)} keys, * = {_ranges([','.join(index.findall(k)) for k in keys])}]"
             for (pattern, note), keys in groups.items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more patterns ({len(items)} keys in this group)"]
    return lines


def _ranges(indices: list[str]) -> str:
    """'0,1,2,3,5' -> '0-3, 5' for single indices; multi-index tuples are listed as they are."""
    if not all(i.isdigit() for i in indices):
        return "; ".join(indices)
    runs: list[list[int]] = []
    for n in sorted(map(int, indices)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---------------------------------------------------------------------------------------------------------------
# Key maps


@functools.lru_cache(maxsize=None)
def _ordered_pairs(family: str, side: int) -> tuple[tuple[str, str], ...]:
    if family not in KEY_MAPS:
        raise UnsupportedModelTypeError(f"no checkpoint key map for family {family!r} (MOSS-VL is not implemented "
                                        f"yet); key maps exist for: {', '.join(sorted(KEY_MAPS))}")
    return tuple(sorted(KEY_MAPS[family], key=lambda pair: len(pair[side]), reverse=True))


def _rewrite(family: str, name: str, src: int) -> str:
    for pair in _ordered_pairs(family, src):
        prefix = pair[src]
        if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
            return pair[1 - src] + name[len(prefix):]
    side = "module" if src == 0 else "hub"
    raise UnmappedKeyError(f"{side} key {name!r} matches no prefix of the {family!r} key map "
                           f"{[p[src] for p in KEY_MAPS[family]]}")


def to_hub_key(family: str, name: str) -> str:
    """Our state-dict name -> hub key, e.g. 'blocks.3.cross_attn.q_proj.weight' ->
    'language_model.model.layers.3.cross_attn.q_proj.weight'."""
    return _rewrite(family, name, 0)


def from_hub_key(family: str, key: str) -> str:
    """Hub key -> our state-dict name (inverse of `to_hub_key`)."""
    return _rewrite(family, key, 1)


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state without aliases, {alias name: canonical name}). Tied tensors are the same object in
    state_dict(keep_vars=True); the first name wins, so embed_tokens.weight is kept and lm_head.weight dropped."""
    unique: dict[str, torch.Tensor] = {}
    aliases, seen = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        canonical = seen.setdefault(id(tensor), name)
        if canonical == name:
            unique[name] = tensor
        else:
            aliases[name] = canonical
    return unique, aliases


def checkpoint_manifest(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Hub key -> shape of every tensor `save_model` writes (tied lm_head skipped). Reads shapes only, so it
    works on a model built on the meta device (e.g. the 11B presets)."""
    return {to_hub_key(model.config.family, name): tuple(t.shape) for name, t in _unique_state(model)[0].items()}


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_model(model: nn.Module, path: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a checkpoint directory loadable by `load_model` (and, for family mllama, transformers).

    Tensors keep the model's dtype. With `max_shard_bytes`, tensors are packed greedily in state-dict order into
    shards of at most that size (a larger single tensor gets its own shard). Earlier weight files in `path` are
    removed first so a stale index or shard can never be mixed into the new checkpoint. Returns the directory."""
    cfg: ModelConfig = model.config
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    unique, _ = _unique_state(model)
    if any(t.device.type == "meta" for t in unique.values()):
        raise ValueError("the model has meta tensors (built on the meta device): there is no data to save")
    tensors = {to_hub_key(cfg.family, name): t.detach() for name, t in unique.items()}  # fails before any I/O
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.name in (SINGLE_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(old.name):
            old.unlink()
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    _write_config(out / CONFIG_NAME, cfg, floats[0] if floats else None)

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size

    def write(keys: list[str], file: Path) -> None:
        # moved to CPU one shard at a time, so saving from a GPU never holds a second full copy
        save_file({k: tensors[k].to("cpu").contiguous() for k in keys}, str(file), metadata={"format": "pt"})

    if len(shards) == 1:
        write(shards[0], out / SINGLE_NAME)
        return out
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write(keys, out / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def _write_config(file: Path, cfg: ModelConfig, dtype: torch.dtype | None) -> None:
    try:
        data = to_hf_dict(cfg)
        if dtype is not None:
            data["dtype"] = str(dtype).removeprefix("torch.")
    except ValueError as err:  # an ablation variant outside the HF schema: our exact section alone still loads
        log.warning("config.json gets no Hugging Face fields: %s", err)
        data = {}
    data["mossvl_lab"] = cfg.to_dict()
    file.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise CheckpointNotFoundError(f"checkpoint directory {str(root)!r} {what}; load_model takes a local "
                                      f"directory holding {CONFIG_NAME} and *.safetensors (download hub repos first, "
                                      "e.g. with huggingface_hub.snapshot_download)")
    if not (root / CONFIG_NAME).is_file():
        raise CheckpointNotFoundError(f"no {CONFIG_NAME} in {str(root)!r}; it contains: {_listing(root)}")
    return root


def _listing(root: Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not names:
        return "nothing (empty directory)"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint: our exact "mossvl_lab" section when present, else the HF fields."""
    data = json.loads((_checkpoint_dir(path) / CONFIG_NAME).read_text())
    if "mossvl_lab" in data:
        return ModelConfig.from_dict(data["mossvl_lab"])
    return from_hf_dict(data)


def _weight_files(root: Path) -> list[Path]:
    """Shard files named by the index (in order of first appearance), or the single file."""
    if (root / INDEX_NAME).is_file():
        weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointNotFoundError(f"{INDEX_NAME} in {str(root)!r} names shard(s) {absent} that are not "
                                          f"there; it contains: {_listing(root)}")
        return files
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    raise CheckpointNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {str(root)!r} (only safetensors weights are "
                                  f"read); it contains: {_listing(root)}")


def _hub_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Hub key -> shape from the safetensors headers alone (no tensor data is read)."""
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_hub_tensors(path: str | os.PathLike, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, progress: bool = True,
                     keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (or only `keys`) by hub key, read straight onto `device` (default CPU).
    `dtype` converts floating tensors only (integer buffers keep theirs). A tqdm bar runs over shards when
    there is more than one and `progress` is set."""
    files = _weight_files(_checkpoint_dir(path))
    device = str(torch.device(device)) if device is not None else "cpu"
    if len(files) > 1 and progress:
        from tqdm import tqdm  # lazy: plain tqdm, so the library never pulls in notebook machinery
        files = tqdm(files, desc="loading shards", unit="shard")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=device) as f:
            for key in f.keys():
                if keys is None or key in keys:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _build_model(cfg: ModelConfig, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    from .model import build_model  # lazy: model.py imports every component

    return build_model(cfg, device=device, dtype=dtype)


@contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is swapped for a meta tensor of the same shape, so building
    costs no parameter memory and init kernels do nothing, while buffers (RoPE tables, computed in __init__) stay
    real. Patches nn.Module globally (as accelerate's init_empty_weights does): do not build models in other
    threads meanwhile. Already-meta parameters are kept as they are, which keeps tied parameters tied."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _skeleton(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """The model with meta parameters and real buffers on `device`; a full random-init build if the builder
    cannot run that way (e.g. it reads a parameter's value), since loading assigns every parameter anyway."""
    try:
        with _parameters_on_meta():
            model = _build_model(cfg, device, dtype)
        if not any(b.device.type == "meta" for b in model.buffers()):
            return model
        log.debug("builder left meta buffers; building with real parameters instead")
    except (RuntimeError, NotImplementedError) as err:
        log.debug("meta-parameter build failed (%s); building with real parameters instead", err)
    return _build_model(cfg, device, dtype)


def load_model(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               progress: bool = True) -> "MossModel":
    """Build the model a checkpoint directory describes and load its weights; returned in eval mode.

    Tensors are read straight onto `device` (default CPU) and assigned, never copied into a random-init model, so
    peak memory is one copy of the weights. `dtype` converts floating tensors; None keeps the stored dtype. Every
    missing, unexpected or mis-shaped key is reported at once (CheckpointMismatchError) before any data is read."""
    root = _checkpoint_dir(path)
    cfg = load_config(root)
    target = torch.device(device) if device is not None else torch.device("cpu")
    model = _skeleton(cfg, target, dtype)
    unique, aliases = _unique_state(model)
    expected = {to_hub_key(cfg.family, name): tuple(t.shape) for name, t in unique.items()}
    found = _hub_shapes(_weight_files(root))
    # exporters that also write a tied lm_head are fine: the tie, not the file, decides its value
    tolerated = {to_hub_key(cfg.family, alias) for alias in aliases}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in tolerated]
    mismatched = {k: (expected[k], found[k]) for k in expected if k in found and found[k] != expected[k]}
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source=f"checkpoint {str(root)!r}")

    hub = read_hub_tensors(root, device=target, dtype=dtype, progress=progress, keys=set(expected))
    state = {from_hub_key(cfg.family, key): t for key, t in hub.items()}
    model.load_state_dict(state, strict=False, assign=True)  # not strict: aliases are re-tied below
    for alias, canonical in aliases.items():
        (owner, _, leaf), (c_owner, _, c_leaf) = alias.rpartition("."), canonical.rpartition(".")
        setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(c_owner), c_leaf))
    model.to(target)  # buffers built on CPU by a builder that ignores `device`
    return model.eval()
