"""Interventions and component swaps (issue: instrumentation)."""

from __future__ import annotations

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.config import ToyConvConfig
from mossvl_lab.interventions import ablate_frames, frame_attention_mass, hide_frames, patch_from, zero_gates
from mossvl_lab.swaps import swap
from reference import tiny_model


def _model(preset="video-preview-tiny", seed=0):
    return tiny_model(preset, seed)


def _clip(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = model.config.tokens.image_token_id
    ids = torch.tensor([[image, 11, 12, image, 13, 14, 15, 16]])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 2, 1, 3, 56, 56, generator=g))


@pytest.mark.parametrize("preset", ["video-preview-tiny", "mllama-tiny"])
def test_zero_gates_gives_exactly_the_text_only_logits(preset):
    model = _model(preset)
    clip = _clip(model)
    with torch.no_grad():
        with model.hooks(zero_gates(model)):
            gated_off = model(**clip).logits
        text_only = model(inputs_embeds=model.embed_tokens(clip["input_ids"])).logits  # no frames at all
        live = model(**clip).logits
    assert torch.equal(gated_off, text_only)
    assert (live - text_only).abs().max() > 1e-3


def test_patching_every_activation_from_run_b_reproduces_b():
    model = _model()
    a, b = _clip(model, seed=1), _clip(model, seed=2)
    b["input_ids"] = b["input_ids"].clone()
    b["input_ids"][0, 1:3] = torch.tensor([40, 41])  # a different clip and different words
    with torch.no_grad():
        out_b, cache_b = model.run_with_cache(**b)
        everything_but_logits = [n for n in cache_b if n != "hook_logits"]
        with model.hooks(patch_from(cache_b, everything_but_logits)):
            patched = model(**a).logits
        # patching only the frames is a real experiment: it equals A's words with B's pixels
        with model.hooks(patch_from(cache_b, ["vision.hook_frame_tokens"])):
            frames_only = model(**a).logits
        expected = model(a["input_ids"], pixel_values=b["pixel_values"]).logits
    assert torch.equal(patched, out_b.logits)
    assert torch.allclose(frames_only, expected, atol=1e-6)


def test_zero_and_mean_ablation_of_a_frame():
    model = _model()
    clip = _clip(model)
    with torch.no_grad():
        _, base = model.run_with_cache(names_filter="vision.hook_frame_tokens", **clip)
        frames = base["vision.hook_frame_tokens"]
        for mode, expected in (("zero", torch.zeros_like(frames[1])), ("mean", frames.mean(dim=(0, 1)).expand_as(frames[1]))):
            seen = {}
            record = ("vision.hook_frame_tokens", lambda x, hook: seen.setdefault("x", x))
            with model.hooks(ablate_frames([1], mode=mode) + [record]):
                model(**clip)
            assert torch.allclose(seen["x"][1], expected) and torch.equal(seen["x"][0], frames[0])


def test_hiding_a_frame_from_rows_equals_a_mask_that_never_showed_it():
    """Hiding frame 1 from every row equals an explicit mask in which every row sees frame 0 only
    (an independent route to the same visibility)."""
    model = _model("mllama-tiny")
    clip = _clip(model)
    ids = clip["input_ids"]
    mask = torch.zeros(1, ids.shape[1], 2, 4, dtype=torch.long)
    mask[0, :, 0, 0] = 1  # every row sees frame 0 only (frame 0's placeholder is the first token)
    clip4 = dict(input_ids=ids, pixel_values=torch.randn(1, 2, 4, 3, 56, 56),
                 aspect_ratio_ids=torch.tensor([[1, 1]]), aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]] * 2]))
    with torch.no_grad():
        with model.hooks(hide_frames(model, frames=[1])):
            hidden = model(**clip4).logits
        explicit = model(**clip4, cross_attention_mask=mask).logits
    assert torch.allclose(hidden, explicit, atol=1e-6)


@pytest.mark.parametrize("preset", ["video-preview-tiny", "mllama-tiny"])
def test_hiding_a_frame_in_a_decode_step_that_sees_every_key(preset):
    """A decode step after every frame sees every cached key, so the model skips building a key mask; hiding
    frame 1 there must still equal feeding that step an explicit mask that shows frame 0 only."""
    model = _model(preset)
    clip = _clip(model)
    if preset == "mllama-tiny":  # every tile real: no padding keys, so the step takes the unmasked route
        clip.update(pixel_values=torch.randn(1, 2, 4, 3, 56, 56), aspect_ratio_ids=torch.tensor([[6, 6]]),
                    aspect_ratio_mask=torch.ones(1, 2, 4, dtype=torch.long))
    state = ml.StreamState()
    step = torch.tensor([[17]])
    with torch.no_grad():
        model(**clip, state=state)
        assert int(state.vision.key_frame.min()) >= 0
        mark = state.mark()
        open_step = model(step, state=state).logits
        state.restore(mark)
        with model.hooks(hide_frames(model, frames=[1])):
            hidden = model(step, state=state).logits
        state.restore(mark)
        tiles = clip["pixel_values"].shape[2]
        only_frame_0 = torch.zeros(1, 1, 2, tiles, dtype=torch.long)  # [batch, text_pos, frame, tile]
        only_frame_0[:, :, 0] = 1
        explicit = model(step, state=state, cross_attention_mask=only_frame_0).logits
    assert torch.allclose(hidden, explicit, atol=1e-6)
    assert (hidden - open_step).abs().max() > 1e-4  # frame 1 mattered, so hiding it was tested


def test_frame_attention_mass_sums_each_frames_keys():
    model = _model()
    clip = _clip(model)
    layer = model.config.text.cross_attention_layers[0]
    state = ml.StreamState()
    with torch.no_grad():
        _, cache = model.run_with_cache(names_filter=f"blocks.{layer}.cross_attn.hook_pattern", state=state, **clip)
    pattern = cache[f"blocks.{layer}.cross_attn.hook_pattern"]
    mass = frame_attention_mass(pattern, state.vision.key_frame)
    per_frame = model.config.vision.tokens_per_tile
    assert torch.allclose(mass[..., 0], pattern[..., :per_frame].sum(-1))
    assert torch.allclose(mass[..., 1], pattern[..., per_frame:].sum(-1))
    assert torch.allclose(mass[0, :, 3:].sum(-1), torch.ones(mass.shape[1], mass.shape[2] - 3))


def test_swap_report_lists_exactly_the_reinitialised_parameters(tmp_path):
    model = _model()
    variant, report = swap(model, {"vision": ToyConvConfig(image_size=56)})
    new_vision = {n for n in variant.state_dict() if n.startswith("vision.")}
    old_vision = {n for n in model.state_dict() if n.startswith("vision.")}
    # independent expectation: every new vision tensor whose name and shape do not occur in the old tower
    old_shapes = {n: t.shape for n, t in model.state_dict().items()}
    expected = {n for n in new_vision if old_shapes.get(n) != variant.state_dict()[n].shape}
    assert set(report.reinitialised) == expected
    assert set(report.dropped) == old_vision - new_vision
    for name in report.reused:
        assert torch.equal(variant.state_dict()[name], model.state_dict()[name])
    ml.save_model(variant, tmp_path)
    again = ml.load_model(tmp_path)
    clip = _clip(model)
    with torch.no_grad():
        assert torch.equal(again(**clip).logits, variant(**clip).logits)


@pytest.mark.parametrize("changes,dropped", [
    ({"cross_attention.key_rope": "none"}, 0),
    ({"cross_attention.gate": "ones"}, 4),
    ({"text.rope.kind": "default"}, 0),
])
def test_config_only_swaps_keep_every_weight(changes, dropped):
    model = _model()
    variant, report = swap(model, changes)
    assert report.reinitialised == () and len(report.dropped) == dropped
    with torch.no_grad():
        out = variant(**_clip(model)).logits
    assert torch.isfinite(out).all()


def test_numerics_modes():
    model = _model()
    clip = _clip(model)
    with torch.no_grad():
        reference = model.set_numerics("reference")(**clip).logits
        analysis = model.set_numerics("analysis")(**clip).logits
    assert torch.allclose(reference, analysis, atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        model.set_numerics("fast")
