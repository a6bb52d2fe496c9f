"""FrameAttentionView: its bars, heatmap and staircase equal what the session's cross-attention did while streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.viz.attention_data import (AttentionChoiceError, IncompleteRecordingError, NoFramesError,
                                           NoRecordingError, TokenIndexError, record_stream)
from mossvl_lab.widgets import FrameAttentionView, StreamStepper, WidgetInputError
from reference import tiny_model

SIZES = {"video-preview-tiny": 56, "moss-vl-tiny": 64}  # each preset's image_size


def _clip(size: int, frames: int = 3):
    clip = make_clip(11, size=size, min_seconds=frames, max_seconds=frames)
    return [(f, ts) for f, ts in zip(clip.frames, clip.timestamps)]


def _stream_with_live_patterns(model, processor, size):
    """Step a clip through a StreamStepper while hooks copy every cross-attention pattern the session computes.
    Returns the stepper and {token index: {layer: [head, vis seen then]}}."""
    stepper = StreamStepper(model=model, processor=processor, clip=_clip(size), max_tokens_per_turn=2)
    live: dict[int, dict[int, torch.Tensor]] = {}

    def keep(pattern, hook):  # [batch, head, query_pos, vis]; the stream's cursor already counts this forward
        end = stepper.session.stream.tokens_seen
        layer = int(hook.name.split(".")[1])
        for q in range(pattern.shape[2]):
            live.setdefault(end - pattern.shape[2] + q, {})[layer] = pattern[0, :, q].clone()

    layers = model.config.text.cross_attention_layers
    with model.hooks([(f"blocks.{layer}.cross_attn.hook_pattern", keep) for layer in layers]):
        stepper.run()
    # rows of the first frame's forward before its placeholder see no frame: all-zero, never uniform
    first = min(t for t, rows in live.items() if any(row.any() for row in rows.values()))
    assert not any(row.any() for t, rows in live.items() if t < first for row in rows.values())
    return stepper, {t: rows for t, rows in live.items() if t >= first}


def _frame_mass(rows: torch.Tensor, spans) -> np.ndarray:
    """rows [head, vis] -> mass [head, frame] by summing each frame's token span."""
    return np.stack([rows[:, s:e].sum(-1).numpy() if s < rows.shape[1] else np.zeros(rows.shape[0]) for s, e in spans], -1)


@pytest.fixture(scope="module", params=list(SIZES))
def streamed(request):
    model = tiny_model(request.param, 0)
    processor = ml.processor_for_model(model.config)
    stepper, live = _stream_with_live_patterns(model, processor, SIZES[request.param])
    return model, stepper, live, FrameAttentionView.from_session(stepper)


def test_bars_equal_the_mass_the_streaming_session_put_on_each_frame(streamed):
    model, stepper, live, view = streamed
    spans = [seg.token_span for seg in stepper.session.stream.vision.segments]
    layers = list(model.config.text.cross_attention_layers)
    assert view.layers == layers and len(view.bars) == len(spans) == 3
    tokens = sorted(live)
    for token in (tokens[0], tokens[len(tokens) // 2], tokens[-1]):
        per_layer = {layer: _frame_mass(live[token][layer], spans) for layer in layers}  # [head, frame]
        view.set_state({"token": token, "layer": -1, "head": -1})  # what a click and the dropdowns send
        expected = np.mean([m.mean(0) for m in per_layer.values()], axis=0)
        assert view.bars == pytest.approx(expected.tolist(), abs=1e-4)
        assert sum(view.bars) == pytest.approx(1.0, abs=1e-4)
        view.set_state({"layer": layers[-1], "head": 1})
        assert view.bars == pytest.approx(per_layer[layers[-1]][1].tolist(), abs=1e-4)
        assert np.allclose(view.mass(), per_layer[layers[-1]][1], atol=1e-4)


def test_the_replay_pattern_equals_the_streamed_pattern_row_for_row(streamed):
    model, stepper, live, view = streamed
    data = view.data
    assert min(live) == data.first_row
    for token, rows in live.items():
        for layer, row in rows.items():
            replay = data.pattern[data.layers.index(layer), :, token - data.first_row]
            assert np.allclose(replay[:, :row.shape[1]], row.numpy(), atol=1e-4)
            assert not replay[:, row.shape[1]:].any()  # frames that arrived later were invisible then


def test_clicking_another_token_changes_the_plotted_data(streamed):
    _, _, live, view = streamed
    first, last = min(live), max(live)
    view.set_state({"token": first, "layer": -1, "head": -1, "frame": -1})
    before = list(view.bars)
    view.set_state({"token": last})
    assert view.token == last and view.bars != before


def test_staircase_marks_the_frames_each_token_could_see(streamed):
    _, stepper, live, view = streamed
    spans = [seg.token_span for seg in stepper.session.stream.vision.segments]
    rows = {tok["i"]: vis for tok, vis in zip(view.tokens, view.visibility)}
    for token, by_layer in live.items():
        seen = _frame_mass(next(iter(by_layer.values())), spans).sum(0) > 0
        assert rows[token] == "".join("1" if s else "0" for s in seen)
    placeholders = [tok["i"] for tok in view.tokens if tok["frame"] >= 0]
    assert placeholders == view.data.placeholders and view.tokens[0]["i"] == placeholders[0]
    assert [rows[p] for p in placeholders] == ["100", "110", "111"]


def test_heatmap_spreads_a_frames_mass_over_its_patches(streamed):
    _, _, live, view = streamed
    view.set_state({"token": max(live), "layer": -1, "head": -1, "frame": 1})
    heat = view.heatmap
    assert heat["frame"] == 1 and heat["rows"] * heat["cols"] == len(heat["values"]) == 16
    assert sum(heat["values"]) + sum(heat["extra"]) == pytest.approx(view.bars[1], abs=1e-5)
    view.set_state({"frame": -1})  # default: the frame the token attends to most
    assert view.heatmap["frame"] == int(np.argmax(view.bars))


def test_built_from_a_clip_it_streams_and_shows_thumbnails(tiny):
    model, processor = tiny
    clip = _clip(56, frames=2)
    view = FrameAttentionView(model, processor, clip, prompt="what moves?", max_tokens_per_turn=2)
    assert [f["timestamp"] for f in view.frames] == [ts for _, ts in clip]
    assert all(f["thumb"].startswith("data:image/png;base64,") for f in view.frames)
    assert view.token == view.data.num_tokens - 1 and view.tokens[-1]["i"] == view.token
    shown = len(view.tokens)
    view.show_prompt = True
    assert len(view.tokens) == view.data.num_tokens > shown and set(view.visibility[0]) == {"0"}


def test_bad_choices_and_unrecorded_sessions_get_named_errors(tiny, streamed):
    model, processor = tiny
    _, _, _, view = streamed
    with pytest.raises(TokenIndexError, match="out of range"):
        view.token = view.data.num_tokens
    with pytest.raises(AttentionChoiceError, match="not a cross-attention layer"):
        view.layer = 0
    with pytest.raises(AttentionChoiceError, match="head"):
        view.select(head=view.num_heads)
    with pytest.raises(AttentionChoiceError, match="frame"):
        view.frame = 3
    session = ml.RealtimeSession(model, processor)
    with pytest.raises(NoRecordingError, match="record_stream"):
        FrameAttentionView.from_session(session)
    record_stream(session)
    session.step()
    with pytest.raises(NoFramesError):
        FrameAttentionView.from_session(session)
    late = ml.RealtimeSession(model, processor)
    late.step()
    record_stream(late)
    with pytest.raises(IncompleteRecordingError):
        FrameAttentionView.from_session(late)
    record_stream(session).detach()
    session.push_frame(*_clip(56, frames=1)[0])
    session.step()  # a forward nobody recorded: recording again cannot bridge the gap
    record_stream(session)
    with pytest.raises(IncompleteRecordingError):
        FrameAttentionView.from_session(session)
    with pytest.raises(WidgetInputError, match="not both"):
        FrameAttentionView(model, data=view.data)
