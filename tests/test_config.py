"""The frozen config tree: presets, JSON round-trip, overrides and validation."""

from __future__ import annotations

import dataclasses

import pytest

import mossvl_lab as ml
from mossvl_lab.config import ConfigError, ModelConfig


def test_presets_listed_and_required_ones_present():
    names = ml.config.presets()
    for required in ("mllama-tiny", "video-preview-tiny", "video-preview-small", "moss-video-preview-11b",
                     "moss-vl-tiny", "moss-vl-11b"):
        assert required in names


@pytest.mark.parametrize("name", ml.config.presets())
def test_json_round_trip_is_exact(name):
    cfg = ml.config.preset(name)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    nested = getattr(again.vision, "supported_aspect_ratios", ((1, 1),))
    assert isinstance(nested[0], tuple)  # lists from JSON come back as the tuples the frozen tree holds


def test_configs_are_frozen():
    cfg = ml.config.preset("mllama-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.family = "moss_vl"


def test_override_by_dotted_path_keeps_everything_else():
    cfg = ml.config.preset("video-preview-tiny")
    variant = ml.config.override(cfg, {"text.rope.kind": "none", "cross_attention.key_rope": "none"})
    assert variant.text.rope.kind == "none" and variant.cross_attention.key_rope == "none"
    assert variant.text.rope.theta == cfg.text.rope.theta and variant.vision == cfg.vision
    assert cfg.text.rope.kind == "llama3"  # the original is untouched


@pytest.mark.parametrize("changes,needle", [
    ({"text.rope.kind": "sideways"}, "RopeConfig.kind"),
    ({"text.num_kv_heads": 3}, "num_kv_heads"),
    ({"text.cross_attention_layers": [9]}, "cross_attention_layers"),
    ({"vision.pool_mode": "median"}, "pool_mode"),
    ({"text.no_such_field": 1}, "no_such_field"),
])
def test_invalid_values_name_the_field(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ml.config.override(ml.config.preset("video-preview-tiny"), changes)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="video-preview-tiny"):
        ml.config.preset("video-preview-huge")


def test_video_preview_small_is_a_few_tens_of_millions_of_parameters():
    model = ml.build_model(ml.config.preset("video-preview-small"), device="meta")
    count = sum(p.numel() for p in model.parameters())
    print(f"video-preview-small: {count / 1e6:.1f} M parameters")
    assert 10e6 <= count <= 90e6
