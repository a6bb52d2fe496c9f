"""Notebook widgets for mossvl-lab, imported as `mossvl_lab.widgets`.

    from mossvl_lab.widgets import StreamStepper, FrameAttentionView, KVCacheInspector, Webcam, LiveStream

Each widget is one `<name>.py` (an anywidget class with synced traits, usable from Python without a browser)
plus its plain ESM `<name>.js` and the shared `widgets.css`: no build step, no CDN imports. This package never
imports torch at import time; the adapters in `mossvl_lab.viz.*_data` turn tensors into numbers, bytes and dicts.
Classes load on first access, so `import mossvl_lab.widgets` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["StreamStepper", "FrameAttentionView", "KVCacheInspector", "Webcam", "LiveStream"]

_LAZY = {
    "StreamStepper": "stream_stepper",
    "Snapshot": "stream_stepper",
    "StepIndexError": "stream_stepper",
    "ClipExhaustedError": "stream_stepper",
    "FrameAttentionView": "frame_attention",
    "KVCacheInspector": "kv_cache",
    "Webcam": "webcam",
    "LiveStream": "live_stream",
    "WidgetInputError": "_common",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
