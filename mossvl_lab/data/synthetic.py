"""Procedural timestamped clips: coloured shapes that appear, leave, move and change colour, at 1 fps.

Every clip comes with what a real-time model should say (a caption at each event frame, silence
elsewhere; a reply to a mid-stream question when it is asked, the colour or "not here", revised when the
scene changes) and offline QA pairs that need timestamps. Seeds decide everything, so held-out seeds form a
fixed evaluation set (`EVAL_SEEDS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SHAPES = ("square", "circle", "triangle")
EVENT_KINDS = ("appear", "leave", "move", "recolor")
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
BACKGROUND = (96, 96, 96)
GRID = 2  # shapes sit in the cells of a GRID x GRID layout; 2 aligns cells with both tiny towers' token grids
EVAL_SEEDS = range(1_000_000, 1_000_200)  # held out: training draws from seeds below 1_000_000
# How the replies to a mid-stream question name its shape. "plain": "the square is red". "named" (task v3
# option): a capitalised name, "the Square is red", a spelling captions never use. Every question gets a reply
# when asked, so a later caption needs a revision exactly when its shape matches the name in that reply: one
# token to match, where "plain" needs a second hop (the word before the shape). The question itself stays as a
# user types it ("what color is the square?"): its shape word is the one bound to pictures, which the answer at
# the asked frame needs (a run that named the shape in the question too never answered a present shape's colour
# at that frame, 0/8). Metrics ignore case, so targets score alike under both styles. Measured (session 8, one
# run, video-preview-tiny recipe): named replies did not pay off: the reply at the asked frame must now turn
# " square" into " Square", and it often named the wrong shape; revisions 9/41 right (plain shipped: 4/41).
QUESTION_STYLES = ("plain", "named")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    cell: int  # 0 .. GRID * GRID - 1, row-major

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneEvent:
    frame: int
    kind: str          # appear | leave | move | recolor
    shape: str
    color: str         # the colour before the event (for recolor, the old colour)
    new_color: str | None = None

    @property
    def caption(self) -> str:
        if self.kind == "appear":
            return f"a {self.color} {self.shape} appears"
        if self.kind == "leave":
            return f"the {self.color} {self.shape} leaves"
        if self.kind == "move":
            return f"the {self.color} {self.shape} moves"
        return f"the {self.color} {self.shape} turns {self.new_color}"


@dataclass(frozen=True)
class Question:
    """Asked after frame `asked_at`: 'what colour is the <shape>?'. Answered once the shape is visible
    and again (revised) whenever its colour changes."""

    asked_at: int
    shape: str
    style: str = "plain"  # one of QUESTION_STYLES

    @property
    def subject(self) -> str:
        """The shape as the replies spell it."""
        return self.shape.capitalize() if self.style == "named" else self.shape

    @property
    def text(self) -> str:
        return f"what color is the {self.shape}?"


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    kind: str = "what_at"  # what_at: "what happened at T?" -> a caption; when: "when did X ...?" -> "at T seconds"


@dataclass(frozen=True)
class Clip:
    seed: int
    frames: np.ndarray                 # [frame, height, width, 3] uint8
    timestamps: tuple[float, ...]      # seconds, 1 fps
    events: tuple[SceneEvent, ...]
    question: Question | None
    qa: tuple[QAPair, ...] = field(default=())
    # training only: more mid-stream questions, each about another shape and asked at another frame
    extra_questions: tuple[Question, ...] = field(default=())

    @property
    def questions(self) -> tuple[Question, ...]:
        """Every mid-stream question, in the order they are asked."""
        asked = ((self.question,) if self.question is not None else ()) + self.extra_questions
        return tuple(sorted(asked, key=lambda q: q.asked_at))

    def speech(self) -> dict[int, str]:
        """What the model should say after each frame (absent = silence): event captions, then the answers to
        the questions (in the order asked) whose evidence appears or changes at that frame."""
        return {frame: ", ".join(captions + replies) for frame, (captions, replies) in self.speech_parts().items()}

    def speech_parts(self) -> dict[int, tuple[list[str], list[str]]]:
        """speech() before joining: frame -> (event captions, replies to mid-stream questions), for frames with
        anything to say."""
        parts: dict[int, tuple[list[str], list[str]]] = {}
        for event in self.events:
            parts.setdefault(event.frame, ([], []))[0].append(event.caption)
        for question in self.questions:
            for frame, answer in question_answers(self, question):
                parts.setdefault(frame, ([], []))[1].append(answer)
        return dict(sorted(parts.items()))

    def reply_frames(self) -> set[int]:
        """The frames whose target speech carries a reply to a mid-stream question."""
        return {frame for frame, (_, replies) in self.speech_parts().items() if replies}


def _draw(frame: np.ndarray, shape: Shape) -> None:
    size = frame.shape[0]
    cell = size // GRID
    row, col = divmod(shape.cell, GRID)
    y0, x0, r = row * cell, col * cell, cell // 2 - 2
    cy, cx = y0 + cell // 2, x0 + cell // 2
    yy, xx = np.mgrid[y0:y0 + cell, x0:x0 + cell]
    if shape.shape == "square":
        inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    elif shape.shape == "circle":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:  # triangle pointing up
        inside = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    frame[y0:y0 + cell, x0:x0 + cell][inside] = COLORS[shape.color]


def render(scene: list[Shape], size: int) -> np.ndarray:
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    for shape in scene:
        _draw(frame, shape)
    return frame


def make_clip(seed: int, *, size: int = 64, min_seconds: int = 8, max_seconds: int = 40,
              event_rate: float = 0.25, with_question: bool = True,
              kind_weights: Mapping[str, float] | None = None, extra_questions: int = 0,
              question_style: str = "plain") -> Clip:
    """One clip: at most one shape of each kind on screen; each second an event happens with
    probability `event_rate` (never in the first frame, which only sets the scene).

    kind_weights: relative odds of the event kinds possible at that moment (missing kinds weigh 1); None draws
    them uniformly, as the evaluation clips do. Training can oversample kinds a model learns last (moves).
    extra_questions: up to len(SHAPES) - 1 more questions (training only: evaluation clips ask one), each about a
    shape no other question asks about, at a frame no other question is asked at; they give a model more
    question -> answer pairs per clip than the ~1 in 5 spoken frames a single question yields.
    question_style: how replies spell the question's shape (QUESTION_STYLES); the scene is the same."""
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"question_style must be one of {QUESTION_STYLES}, got {question_style!r}")
    if not 0 <= extra_questions < len(SHAPES):
        raise ValueError(f"extra_questions must be in 0..{len(SHAPES) - 1}, got {extra_questions}")
    if kind_weights is not None:
        unknown = set(kind_weights) - set(EVENT_KINDS)
        if unknown or any(w < 0 for w in kind_weights.values()):
            raise ValueError(f"kind_weights: kinds must be among {EVENT_KINDS} with weights >= 0, got {dict(kind_weights)}")
    rng = np.random.default_rng(seed)
    length = int(rng.integers(min_seconds, max_seconds + 1))
    scene: list[Shape] = []
    frames, events = [], []
    for t in range(length):
        if t > 0 and rng.random() < event_rate:
            event = _random_event(rng, scene, t, kind_weights)
            if event is not None:
                events.append(event)
        frames.append(render(scene, size))
    question = None
    if with_question:
        question = Question(asked_at=int(rng.integers(0, max(1, length // 2))), shape=str(rng.choice(SHAPES)),
                            style=question_style)
    clip = Clip(seed=seed, frames=np.stack(frames), timestamps=tuple(float(t) for t in range(length)),
                events=tuple(events), question=question)
    qa = offline_qa(clip, rng)
    extra = _extra_questions(question, length, extra_questions, rng) if question is not None else ()
    return replace(clip, qa=qa, extra_questions=extra)


def _extra_questions(first: Question, length: int, count: int, rng: np.random.Generator) -> tuple[Question, ...]:
    """`count` questions about the shapes `first` does not ask about, at distinct frames other than its own.
    Drawn after everything else so the clip of a seed is the same with or without them."""
    frames = [t for t in range(length) if t != first.asked_at]
    count = min(count, len(frames))
    if not count:
        return ()
    shapes = rng.permutation([s for s in SHAPES if s != first.shape])[:count]
    asked = rng.choice(frames, size=count, replace=False)
    return tuple(Question(asked_at=int(t), shape=str(shape), style=first.style) for t, shape in zip(asked, shapes))


def _random_event(rng: np.random.Generator, scene: list[Shape], t: int,
                  kind_weights: Mapping[str, float] | None) -> SceneEvent | None:
    present = {s.shape for s in scene}
    free_cells = [c for c in range(GRID * GRID) if c not in {s.cell for s in scene}]
    options = []
    if len(present) < len(SHAPES) and free_cells:
        options.append("appear")
    if scene:
        options += ["leave", "recolor"] + (["move"] if free_cells else [])
    if kind_weights is not None:
        options = [kind for kind in options if kind_weights.get(kind, 1.0) > 0]
    if not options:
        return None
    if kind_weights is None:  # the uniform draw keeps every existing seed's clip (the evaluation set) unchanged
        kind = str(rng.choice(options))
    else:
        odds = np.array([kind_weights.get(kind, 1.0) for kind in options])
        kind = str(rng.choice(options, p=odds / odds.sum()))
    if kind == "appear":
        shape = Shape(str(rng.choice([s for s in SHAPES if s not in present])), str(rng.choice(list(COLORS))),
                      int(rng.choice(free_cells)))
        scene.append(shape)
        return SceneEvent(t, "appear", shape.shape, shape.color)
    target = scene[int(rng.integers(len(scene)))]
    index = scene.index(target)
    if kind == "leave":
        scene.pop(index)
        return SceneEvent(t, "leave", target.shape, target.color)
    if kind == "move":
        scene[index] = Shape(target.shape, target.color, int(rng.choice(free_cells)))
        return SceneEvent(t, "move", target.shape, target.color)
    new = str(rng.choice([c for c in COLORS if c != target.color]))
    scene[index] = Shape(target.shape, new, target.cell)
    return SceneEvent(t, "recolor", target.shape, target.color, new_color=new)


def question_answers(clip: Clip, question: Question | None = None) -> list[tuple[int, str]]:
    """(frame, answer) for a mid-stream question (default: the clip's first): at the frame it is asked, the colour
    if the shape is visible, else "the <shape> is not here"; then a revision whenever the shape appears, changes
    colour or leaves. Never before the evidence exists.

    Why every question gets a reply when asked (task v2, session 6): with v1's silence for an absent shape, the
    first answer often came after a later caption and had to be matched against a question up to ~100 tokens
    back, a link the tiny models never formed (attention probe, issue 7). A reply at once keeps question and
    answer adjacent, and later revisions can match against the model's own reply. A real assistant, too,
    acknowledges a question it cannot answer yet."""
    q = clip.question if question is None else question
    color, answers = None, []
    for t in range(len(clip.timestamps)):
        changes = [e for e in clip.events if e.frame == t and e.shape == q.shape and e.kind != "move"]
        for event in changes:
            color = {"appear": event.color, "recolor": event.new_color, "leave": None}[event.kind]
        if t == q.asked_at:
            answers.append((t, f"the {q.subject} is {color or 'not here'}"))
        elif t > q.asked_at and changes:
            answers.append((t, f"the {q.subject} is {color or 'gone'}"))
    return answers


def offline_qa(clip: Clip, rng: np.random.Generator) -> tuple[QAPair, ...]:
    """Questions whose answers need timestamps: what happened at a time, and when something happened."""
    pairs = []
    for event in clip.events:
        pairs.append(QAPair(f"what happened at {clip.timestamps[event.frame]:.1f} seconds?", event.caption))
        if event.kind in ("appear", "leave"):
            verb = "appear" if event.kind == "appear" else "leave"
            pairs.append(QAPair(f"when did the {event.color} {event.shape} {verb}?",
                                f"at {clip.timestamps[event.frame]:.1f} seconds", kind="when"))
    order = rng.permutation(len(pairs)) if pairs else []
    return tuple(pairs[i] for i in order)


def phrase_corpus() -> str:
    """Every caption, question and answer shape of the task, one per line (each shape x colour), for the tiny
    tokenizers to learn merges from: the task's words then become single tokens (a caption is ~6 tokens, not ~20),
    so a tiny model spends its steps on watching rather than on spelling."""
    lines = []
    for shape in SHAPES:
        subjects = (shape, shape.capitalize())  # the reply spellings of QUESTION_STYLES: plain, named
        lines += [f"what color is the {shape}?"] + [f"the {s} is gone" for s in subjects]
        for color in COLORS:
            other = next(c for c in COLORS if c != color)
            lines += [f"a {color} {shape} appears", f"the {color} {shape} leaves", f"the {color} {shape} moves",
                      f"the {color} {shape} turns {other}", *(f"the {s} is {color}" for s in subjects),
                      f"when did the {color} {shape} appear?", f"when did the {color} {shape} leave?"]
    # no digits here: merging some numbers (" 12") but not others would make the same time two spellings
    lines += ["what happened at these seconds?", "at those seconds"] * 3
    return "\n".join(lines)


def write_clip(clip: Clip, path: str | Path) -> Path:
    """The clip as an mp4 at 1 fps through the video backend."""
    from ..processing.video import write_video
    return write_video(clip.frames, path, fps=1.0)
