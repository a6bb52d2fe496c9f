"""HF config.json <-> ModelConfig, checked against what transformers' MllamaConfig itself writes and reads."""

from __future__ import annotations

import json

import pytest

from mossvl_lab.presets import VIDEO_PREVIEW_CROSS
from mossvl_lab.config import ConfigError, CrossAttentionConfig, ModelConfig, preset, presets
from mossvl_lab.hf_config import UnsupportedModelTypeError, from_hf_dict, to_hf_dict

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 128}


def _tiny_hf_config(**text_changes):
    """A tiny MllamaConfig with every value different from the transformers defaults, so defaults cannot pass."""
    text = dict(vocab_size=320, hidden_size=48, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=96, rope_parameters={**LLAMA3, "rope_theta": 1234.5}, rms_norm_eps=1e-6,
                max_position_embeddings=2048, cross_attention_layers=[2, 5], bos_token_id=1, eos_token_id=[2, 7],
                pad_token_id=0, tie_word_embeddings=False)
    text.update(text_changes)
    vision = dict(hidden_size=24, num_hidden_layers=3, num_global_layers=1, attention_heads=3, intermediate_size=40,
                  vision_output_dim=24 * 3, image_size=42, patch_size=7, intermediate_layers_indices=[0, 2],
                  max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], norm_eps=1e-6)
    return transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=320)


def _check_against(cfg: ModelConfig, hf) -> None:
    t, v = hf.text_config, hf.vision_config
    assert cfg.family == "mllama"
    assert cfg.cross_attention == CrossAttentionConfig()
    assert (cfg.text.vocab_size, cfg.text.hidden_size, cfg.text.num_layers) == (t.vocab_size, t.hidden_size,
                                                                             t.num_hidden_layers)
    assert (cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.intermediate_size) == (
        t.num_attention_heads, t.num_key_value_heads, t.intermediate_size)
    assert cfg.text.embedding_rows == t.vocab_size + 8  # transformers' MllamaTextModel embedding table
    assert cfg.text.rms_norm_eps == t.rms_norm_eps
    assert cfg.text.max_position_embeddings == t.max_position_embeddings
    assert list(cfg.text.cross_attention_layers) == t.cross_attention_layers
    assert cfg.text.tie_word_embeddings == t.tie_word_embeddings
    rope = t.rope_parameters
    assert (cfg.text.rope.kind, cfg.text.rope.theta) == (rope["rope_type"], rope["rope_theta"])
    assert (cfg.text.rope.factor, cfg.text.rope.low_freq_factor, cfg.text.rope.high_freq_factor,
            cfg.text.rope.original_max_position_embeddings) == (
        rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_global_layers, cfg.vision.num_heads) == (
        v.hidden_size, v.num_hidden_layers, v.num_global_layers, v.attention_heads)
    assert (cfg.vision.intermediate_size, cfg.vision.image_size, cfg.vision.patch_size) == (
        v.intermediate_size, v.image_size, v.patch_size)
    assert cfg.vision.vision_output_dim == v.vision_output_dim
    assert list(cfg.vision.intermediate_layers_indices) == v.intermediate_layers_indices
    assert [list(r) for r in cfg.vision.supported_aspect_ratios] == v.supported_aspect_ratios
    assert (cfg.vision.max_num_tiles, cfg.vision.norm_eps, cfg.vision.num_channels) == (
        v.max_num_tiles, v.norm_eps, v.num_channels)
    assert (cfg.vision.pool_mode, cfg.vision.full_attention) == ("none", False)
    assert cfg.tokens.image_token_id == hf.image_token_index
    assert (cfg.tokens.bos_token_id, cfg.tokens.pad_token_id) == (t.bos_token_id, t.pad_token_id)
    eos = t.eos_token_id if isinstance(t.eos_token_id, list) else [t.eos_token_id]
    assert list(cfg.tokens.eos_token_ids) == eos


def test_reads_transformers_to_dict():
    hf = _tiny_hf_config()
    _check_against(from_hf_dict(hf.to_dict()), hf)


def test_reads_config_json_written_by_save_pretrained(tmp_path):
    hf = _tiny_hf_config(eos_token_id=5)
    hf.save_pretrained(tmp_path)
    cfg = from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    _check_against(cfg, hf)
    assert cfg.tokens.eos_token_ids == (5,)


def test_reads_transformers_4x_rope_style():
    """4.x configs (what MOSS trained with) carry rope_theta beside rope_scaling, with no rope_parameters."""
    d = _tiny_hf_config().to_dict()
    text = d["text_config"]
    del text["rope_parameters"]
    text.update(rope_theta=1234.5, rope_scaling={**LLAMA3, "type": "llama3"})
    assert from_hf_dict(d) == from_hf_dict(_tiny_hf_config().to_dict())
    text.update(rope_scaling=None, rope_theta=777.0)
    rope = from_hf_dict(d).text.rope
    assert (rope.kind, rope.theta) == ("default", 777.0)


def test_default_rope_and_missing_keys_follow_transformers_defaults():
    stock = transformers.MllamaConfig()  # Llama-3.2-11B-Vision sizes, default rope, image_size 448
    cfg = from_hf_dict({"model_type": "mllama"})
    assert cfg == from_hf_dict(stock.to_dict())
    assert (cfg.text.rope.kind, cfg.text.rope.theta, cfg.vision.image_size) == (
        "default", stock.text_config.rope_parameters["rope_theta"], stock.vision_config.image_size)


def test_to_hf_dict_is_loadable_by_transformers(tmp_path):
    cfg = preset("mllama-tiny")
    d = to_hf_dict(cfg)
    hf = transformers.MllamaConfig(**d)
    _check_against(cfg, hf)
    (tmp_path / "config.json").write_text(json.dumps(d))
    _check_against(cfg, transformers.MllamaConfig.from_pretrained(tmp_path))
    # and back through transformers' own serialisation
    assert from_hf_dict(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", presets())
def test_presets_round_trip(name):
    cfg = preset(name)
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(cfg)))) == cfg


def test_video_preview_11b_round_trip_and_extras():
    cfg = preset("moss-video-preview-11b")
    d = to_hf_dict(cfg)
    assert d["model_type"] == "mllama"
    assert (d["pool_mode"], d["pool_stride"], d["use_full_attn"], d["add_video_position_encoding"]) == (
        "average", 4, True, True)
    assert d["text_config"]["eos_token_id"] == [128001, 128008, 128009]
    assert d["vision_config"]["vision_output_dim"] == 7680
    assert from_hf_dict(d) == cfg


def test_training_code_aliases_select_video_preview():
    d = _tiny_hf_config().to_dict()
    d.update(mllama_pool_mode="average", mllama_use_full_attn=True, mllama_add_video_position_encoding=True,
             silence_token_id=9)
    d["vision_config"]["stride"] = 3  # placement of the extras is unknown: nested keys count too
    cfg = from_hf_dict(d)
    assert cfg.family == "video_preview"
    assert cfg.cross_attention == VIDEO_PREVIEW_CROSS
    assert (cfg.vision.pool_mode, cfg.vision.pool_stride, cfg.vision.full_attention) == ("average", 3, True)
    assert cfg.tokens.silence_token_id == 9
    d["mllama_add_video_position_encoding"] = False
    assert from_hf_dict(d).cross_attention.key_rope == "none"


def test_video_architecture_without_extras_gets_training_defaults():
    d = _tiny_hf_config().to_dict()
    d["architectures"] = ["VideoMllamaForConditionalGeneration"]
    cfg = from_hf_dict(d)
    assert cfg.family == "video_preview"
    assert (cfg.vision.pool_mode, cfg.vision.pool_stride, cfg.vision.full_attention) == ("average", 4, True)
    assert cfg.cross_attention.key_rope == "frame"


def test_unknown_pool_mode_is_a_config_error():
    d = {**_tiny_hf_config().to_dict(), "pool_mode": "channelFusion"}
    with pytest.raises(ConfigError, match="channelFusion"):
        from_hf_dict(d)


@pytest.mark.parametrize("model_type", ["llava", None])
def test_unknown_model_type(model_type):
    with pytest.raises(UnsupportedModelTypeError, match="mllama"):
        from_hf_dict({"model_type": model_type})


def test_published_moss_vl_config_shape_loads():
    """A config.json shaped like the published MOSS-VL one (spec §2.1, §3.1, §7.1) at tiny sizes."""
    d = {"architectures": ["MossVLForConditionalGeneration"], "model_type": "moss_vl", "dtype": "bfloat16",
         "image_token_id": 101, "video_token_id": 102, "vision_start_token_id": 98, "vision_end_token_id": 99,
         "tie_word_embeddings": False, "transformers_version": "4.57.1", "vision_seq_pad_multiple": 1,
         "text_config": {"model_type": "moss_vl_text", "hidden_size": 64, "intermediate_size": 96,
                         "num_hidden_layers": 8, "cross_attention_layers": [2, 6], "num_attention_heads": 4,
                         "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                         "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5],
                                          "mrope_interleaved": True},
                         "max_position_embeddings": 4096, "vocab_size": 128, "attention_bias": False,
                         "hidden_act": "silu", "bos_token_id": 96, "eos_token_id": 97},
         "vision_config": {"model_type": "moss_vl_vision", "depth": 3, "hidden_size": 32, "intermediate_size": 48,
                           "num_heads": 2, "in_channels": 3, "patch_size": 8, "spatial_merge_size": 2,
                           "temporal_patch_size": 1, "num_position_embeddings": 64, "out_hidden_size": 64,
                           "hidden_act": "gelu_pytorch_tanh", "deepstack_visual_indexes": [0, 1]}}
    cfg = from_hf_dict(d)
    assert cfg.family == "moss_vl" and cfg.text.rope.kind == "mrope_interleaved"
    assert cfg.text.rope.mrope_section == (6, 5, 5) and cfg.text.qk_norm and cfg.text.d_head == 32
    assert cfg.vision.depth == 3 and cfg.vision.deepstack_visual_indexes == (0, 1)
    assert (cfg.tokens.image_token_id, cfg.tokens.bos_token_id, cfg.tokens.eos_token_ids) == (101, 96, (97,))
    assert cfg.cross_attention.key_rope == "thw" and cfg.cross_attention.k_norm_before_rope
    assert from_hf_dict(to_hf_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="out_hidden_size"):
        from_hf_dict({**d, "vision_config": {**d["vision_config"], "out_hidden_size": 32}})


def test_inconsistent_vision_output_dim():
    d = _tiny_hf_config().to_dict()
    d["vision_config"]["vision_output_dim"] = 100
    with pytest.raises(ConfigError, match="vision_output_dim=100"):
        from_hf_dict(d)


def test_unrepresentable_rope_is_a_config_error():
    cfg = preset("mllama-tiny")
    with pytest.raises(ConfigError, match="rope"):
        to_hf_dict(cfg.replace(text=cfg.text.replace(rope=cfg.text.rope.replace(kind="none"))))
    d = _tiny_hf_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10.0, "factor": 2.0}).to_dict()
    with pytest.raises(ConfigError, match="yarn"):
        from_hf_dict(d)
