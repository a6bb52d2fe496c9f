"""The streaming timeline figure: frames strip, p(silence) per frame, and attention to earlier frames."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class StreamTrace:
    """What happened after each frame of a streamed clip (filled by `trace_session`-style loops)."""

    frames: list[np.ndarray] = field(default_factory=list)       # [height, width, 3] uint8 each
    timestamps: list[float] = field(default_factory=list)
    p_silence: list[float] = field(default_factory=list)         # the decision right after each frame
    speech: dict[int, str] = field(default_factory=dict)         # frame -> what the model said after it
    attention: list[np.ndarray] = field(default_factory=list)    # per frame: mass on frames 0..k, [k + 1]

    def timeline(self) -> str:
        lines = []
        for k, ts in enumerate(self.timestamps):
            said = self.speech.get(k)
            what = f"speech  {said}" if said else "silence"
            lines.append(f"{ts:6.1f}s  p(silence)={self.p_silence[k]:.2f}  {what}")
        return "\n".join(lines)


def _label(text: str, limit: int = 32) -> str:
    """Printable and short: a plot annotation, not the transcript."""
    clean = "".join(ch if ch.isprintable() and ch != "\ufffd" else "?" for ch in text)
    return clean if len(clean) <= limit else clean[:limit - 1] + "…"


def plot_trace(trace: StreamTrace, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(trace.frames)
    fig = plt.figure(figsize=(max(8, n * 0.55), 7.5))
    grid = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.2, 2.2], hspace=0.45)
    strip = fig.add_subplot(grid[0])
    strip.imshow(np.concatenate(trace.frames, axis=1))
    width = trace.frames[0].shape[1]
    strip.set_xticks([width * (k + 0.5) for k in range(n)], [f"{t:.0f}" for t in trace.timestamps], fontsize=7)
    strip.set_yticks([])
    strip.set_title(title or "frames (seconds)")
    for k in trace.speech:
        strip.axvspan(width * k, width * (k + 1), color="gold", alpha=0.25)
    strip.set_xlim(0, width * n)

    decisions = fig.add_subplot(grid[1])
    decisions.plot(trace.timestamps, trace.p_silence, marker="o", ms=3, color="tab:blue")
    for k, text in trace.speech.items():
        decisions.annotate(_label(text), (trace.timestamps[k], trace.p_silence[k]), fontsize=6, rotation=30,
                           xytext=(2, 6), textcoords="offset points")
    decisions.set_ylim(-0.05, 1.05)
    decisions.set_ylabel("p(silence)")
    decisions.set_xlabel("seconds")

    attention = fig.add_subplot(grid[2])
    matrix = np.zeros((n, n))
    for k, row in enumerate(trace.attention):
        matrix[k, :len(row)] = row
    image = attention.imshow(matrix, aspect="auto", cmap="viridis", origin="upper")
    ticks = list(range(0, n, max(1, n // 10)))
    attention.set_xticks(ticks)
    attention.set_yticks(ticks)
    attention.set_xlabel("attended frame")
    attention.set_ylabel("decision after frame")
    attention.set_title("cross-attention mass on each frame (mean over heads and cross layers)")
    fig.colorbar(image, ax=attention, fraction=0.025)
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
