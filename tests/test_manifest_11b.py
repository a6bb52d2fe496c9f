"""The full-size preset matches transformers' Llama-3.2-11B-Vision key for key and shape for shape
(both built on the meta device: no weights are downloaded or allocated)."""

from __future__ import annotations

import pytest
import torch

import mossvl_lab as ml

pytest.importorskip("transformers")

# Llama-3.2-11B-Vision config.json values (spec moss-video-preview.md §9), written out independently of our presets
VISION = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, attention_heads=16,
              intermediate_size=5120, vision_output_dim=7680, image_size=560, patch_size=14, norm_eps=1e-5,
              max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
              supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
TEXT = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
            intermediate_size=14336, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
            cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], tie_word_embeddings=False,
            bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)


def _transformers_hub_manifest() -> dict[str, tuple[int, ...]]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    cfg = MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=128256)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(cfg)
    # transformers' own inverse of its load-time renaming: what save_pretrained writes to disk
    hub = revert_weight_conversion(model, model.state_dict())
    return {key: tuple(t.shape) for key, t in hub.items()}


def test_moss_video_preview_11b_manifest_equals_transformers_mllama():
    ours = ml.checkpoint_manifest(ml.build_model(ml.config.preset("moss-video-preview-11b"), device="meta"))
    expected = _transformers_hub_manifest()
    missing, extra = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"shape mismatches: {list(wrong.items())[:5]}"
    count = sum(int(torch.Size(s).numel()) for s in ours.values())
    print(f"moss-video-preview-11b: {len(ours)} tensors, {count:,} parameters ({count / 1e9:.2f} B)")
    assert len(ours) == 906
    assert 10.6e9 < count < 10.7e9  # spec §1: text 9.78 B + vision 0.86 B + projector 31.5 M = 10.67 B
