"""Streaming-benchmark metrics: pure functions over per-frame speech, small enough to check by hand.

For one clip, `targets` maps a frame to what the model should say after it (`Clip.speech()`) and `predicted`
maps a frame to what the model said after it (absent = silence). With tolerance 1 frame:

* a target at frame f is **recalled** when the model spoke at a frame g with |g - f| <= 1. Targets are matched
  one-to-one, earliest target first: among the unused spoken frames in the window, the nearest one whose text
  equals the target's (after normalising case and whitespace) is preferred, else the nearest one; ties go to
  the earlier frame;
* **event recall** = recalled / targets;
* **caption exact match** = recalled targets whose matched text equals the target text / recalled; split in
  two diagnostics when the caller marks the targets that carry a reply to a mid-stream question
  (`reply_frames`): **reply exact match** over those, **event-caption exact match** over the rest;
* **mean response delay** = mean of g - f over recalled targets (negative when the model spoke early);
* **false-alarm rate** = quiet frames at which the model spoke / quiet frames, where a quiet frame has no
  target within +-1 frame ("speech when nothing changed");
* **timestamp-QA accuracy** = offline answers equal to the reference (same normalisation) / questions; split in
  two diagnostics when the caller gives each question's kind: **"when" accuracy** ("when did the red square
  leave?" -> a time) and **"what at" accuracy** ("what happened at 12.0 seconds?" -> a caption), because a model
  can learn to read a time off a frame long before it learns to find the frame a time names, or the reverse.

Every score is a `Metrics` of integer counts (plus the delay sum); clips and QA results add up with `+`, and the
rates are properties of the summed counts (NaN when their denominator is zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped."""
    return " ".join(text.lower().split())


def _ratio(num: float, den: int) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class Metrics:
    clips: int = 0
    frames: int = 0
    targets: int = 0           # frames with target speech
    recalled: int = 0          # targets matched by speech within the tolerance
    exact: int = 0             # recalled targets whose matched text equals the target
    reply_recalled: int = 0    # of `recalled`, targets that carry a reply to a mid-stream question
    reply_exact: int = 0       # of `exact`, targets that carry a reply
    delay_sum: int = 0         # sum of (spoken frame - target frame) over recalled targets
    quiet_frames: int = 0      # frames with no target within the tolerance
    false_alarms: int = 0      # quiet frames at which the model spoke
    spoken_frames: int = 0     # frames at which the model spoke at all
    qa_total: int = 0
    qa_correct: int = 0
    qa_when_total: int = 0     # of `qa_total`, "when did ...?" questions (the rest ask what happened at a time)
    qa_when_correct: int = 0   # of `qa_correct`, "when" questions

    def __add__(self, other: "Metrics") -> "Metrics":
        if not isinstance(other, Metrics):
            return NotImplemented
        return Metrics(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def __radd__(self, other: object) -> "Metrics":
        return self if other == 0 else NotImplemented  # sum(scores) starts from 0

    @property
    def event_recall(self) -> float:
        return _ratio(self.recalled, self.targets)

    @property
    def false_alarm_rate(self) -> float:
        return _ratio(self.false_alarms, self.quiet_frames)

    @property
    def caption_exact_match(self) -> float:
        return _ratio(self.exact, self.recalled)

    @property
    def reply_exact_match(self) -> float:
        return _ratio(self.reply_exact, self.reply_recalled)

    @property
    def event_caption_exact_match(self) -> float:
        return _ratio(self.exact - self.reply_exact, self.recalled - self.reply_recalled)

    @property
    def mean_delay_frames(self) -> float:
        return _ratio(self.delay_sum, self.recalled)

    @property
    def qa_accuracy(self) -> float:
        return _ratio(self.qa_correct, self.qa_total)

    @property
    def qa_when_accuracy(self) -> float:
        return _ratio(self.qa_when_correct, self.qa_when_total)

    @property
    def qa_what_at_accuracy(self) -> float:
        return _ratio(self.qa_correct - self.qa_when_correct, self.qa_total - self.qa_when_total)

    RATES = ("event_recall", "false_alarm_rate", "caption_exact_match", "mean_delay_frames", "qa_accuracy")
    SPLIT_RATES = ("event_caption_exact_match", "reply_exact_match",  # diagnostics: in to_dict, not in ablations
                   "qa_when_accuracy", "qa_what_at_accuracy")

    def to_dict(self) -> dict[str, float | int | None]:
        """Rates (None where undefined) followed by the counts: JSON-ready."""
        rates = {name: getattr(self, name) for name in self.RATES + self.SPLIT_RATES}
        out: dict[str, float | int | None] = {k: (None if math.isnan(v) else v) for k, v in rates.items()}
        out.update(dataclasses.asdict(self))
        return out

    def summary(self) -> str:
        def pct(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"
        delay = "n/a" if math.isnan(self.mean_delay_frames) else f"{self.mean_delay_frames:+.2f}"
        split = (f" (event captions {pct(self.event_caption_exact_match)}, replies {pct(self.reply_exact_match)})"
                 if self.reply_recalled else "")
        text = (f"recall {pct(self.event_recall)} ({self.recalled}/{self.targets}), false alarms "
                f"{pct(self.false_alarm_rate)} ({self.false_alarms}/{self.quiet_frames}), captions exact "
                f"{pct(self.caption_exact_match)}{split}, delay {delay} frames")
        if self.qa_total:
            text += f", timestamp QA {pct(self.qa_accuracy)} ({self.qa_correct}/{self.qa_total})"
            if self.qa_when_total:
                text += (f" (when {self.qa_when_correct}/{self.qa_when_total}, what at "
                         f"{self.qa_correct - self.qa_when_correct}/{self.qa_total - self.qa_when_total})")
        return text


def score_clip(targets: Mapping[int, str], predicted: Mapping[int, str], n_frames: int,
               tolerance: int = 1, reply_frames: Collection[int] = ()) -> Metrics:
    """Counts for one clip. targets / predicted: {frame: text}; frames outside 0..n_frames-1 are an error.
    reply_frames: target frames whose text carries a reply to a mid-stream question (for the split counts)."""
    for name, table in (("targets", targets), ("predicted", predicted)):
        bad = [f for f in table if not 0 <= f < n_frames]
        if bad:
            raise ValueError(f"{name} has frames {sorted(bad)} outside 0..{n_frames - 1}")
    spoken = {f: normalize_text(t) for f, t in predicted.items() if normalize_text(t)}
    used: set[int] = set()
    recalled = exact = delay_sum = reply_recalled = reply_exact = 0
    for f in sorted(targets):
        want = normalize_text(targets[f])
        window = [g for g in range(f - tolerance, f + tolerance + 1) if g in spoken and g not in used]
        if not window:
            continue
        window.sort(key=lambda g: (abs(g - f), g))
        matching = [g for g in window if spoken[g] == want]
        g = matching[0] if matching else window[0]
        used.add(g)
        recalled += 1
        exact += int(bool(matching))
        if f in reply_frames:
            reply_recalled += 1
            reply_exact += int(bool(matching))
        delay_sum += g - f
    near_target = {g for f in targets for g in range(f - tolerance, f + tolerance + 1)}
    quiet = [k for k in range(n_frames) if k not in near_target]
    return Metrics(clips=1, frames=n_frames, targets=len(targets), recalled=recalled, exact=exact,
                   reply_recalled=reply_recalled, reply_exact=reply_exact,
                   delay_sum=delay_sum, quiet_frames=len(quiet), false_alarms=sum(k in spoken for k in quiet),
                   spoken_frames=len(spoken))


def score_qa(pairs: Iterable[tuple[str, str]], kinds: Iterable[str] | None = None) -> Metrics:
    """Timestamp-QA counts over (prediction, reference answer) pairs: exact match after normalisation. `kinds`
    (one per pair, QAPair.kind: "when" or "what_at") also counts the "when" questions apart."""
    pairs = list(pairs)
    kinds = list(kinds) if kinds is not None else ["what_at"] * len(pairs)
    if len(kinds) != len(pairs):
        raise ValueError(f"score_qa: {len(kinds)} kinds for {len(pairs)} answers; give one kind per answer")
    correct = [normalize_text(p) == normalize_text(a) for p, a in pairs]
    return Metrics(qa_total=len(pairs), qa_correct=sum(correct), qa_when_total=kinds.count("when"),
                   qa_when_correct=sum(ok for ok, kind in zip(correct, kinds) if kind == "when"))
