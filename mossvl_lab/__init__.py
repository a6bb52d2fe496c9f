"""mossvl-lab: instrumented, swappable re-implementations of the MOSS real-time video-language models.

Dimension vocabulary used in every shape comment:
    batch pos query_pos key_pos vis frame patch head kv_head d_model d_head d_vision d_mlp vocab

`pos` is a text-token index; `vis` indexes vision keys (all frames' tokens, frame-major); `frame` one
image or video frame (one placeholder token in the text). Importing this package stays light: torch and
the config tree only; model building, checkpoints and processors load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import config

__all__ = ["config", "build_model", "load_model", "save_model", "checkpoint_manifest", "load_processor",
           "processor_for_model", "StreamState", "RealtimeSession"]

# public name -> (module, attribute); resolved on first access so `import mossvl_lab` stays cheap
_LAZY = {
    "build_model": ("mossvl_lab.model", "build_model"),
    "MossModel": ("mossvl_lab.model", "MossModel"),
    "ModelOutput": ("mossvl_lab.model", "ModelOutput"),
    "load_model": ("mossvl_lab.checkpoints", "load_model"),
    "save_model": ("mossvl_lab.checkpoints", "save_model"),
    "checkpoint_manifest": ("mossvl_lab.checkpoints", "checkpoint_manifest"),
    "StreamState": ("mossvl_lab.cache", "StreamState"),
    "load_processor": ("mossvl_lab.processing.processor", "load_processor"),
    "RealtimeSession": ("mossvl_lab.streaming.session", "RealtimeSession"),
    "processor_for_model": ("mossvl_lab.processing.processor", "processor_for_model"),
}


# submodules reachable as attributes (ml.swaps.swap, ml.interventions.zero_gates) without importing them eagerly
_LAZY_MODULES = ("widgets", "swaps", "interventions", "streaming", "processing", "generation", "hooks", "presets")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f"mossvl_lab.{name}")
    raise AttributeError(f"module 'mossvl_lab' has no attribute {name!r}")
