"""Independent references for parity tests: tiny transformers Mllama models built from explicit configs."""

from __future__ import annotations

import torch


TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, cross_attention_layers=[1, 3], rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 256},
            max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
              vision_output_dim=96, image_size=56, patch_size=7, max_num_tiles=4, intermediate_layers_indices=[1, 3],
              norm_eps=1e-5, supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
IMAGE_TOKEN = 512


def set_gates_nonzero(module: torch.nn.Module, generator: torch.Generator | None = None) -> None:
    """Cross-attention and tile gates initialise to zero, which would hide those paths from any comparison."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("gate", "_gate", "gate_attn", "gate_ffn")):
                param.copy_(torch.empty_like(param).uniform_(0.3, 1.2, generator=generator))


def tiny_transformers_mllama(seed: int = 0):
    """A random fp32 MllamaForConditionalGeneration with eager attention and every gate non-zero."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = MllamaConfig(vision_config=dict(VISION), text_config=dict(TEXT), image_token_index=IMAGE_TOKEN)
    model = MllamaForConditionalGeneration(cfg)
    model.config._attn_implementation = "eager"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed + 1)
    set_gates_nonzero(model, generator)
    with torch.no_grad():  # tile tables start near zero; make them matter
        for name, param in model.named_parameters():
            if "tile" in name and "embedding" in name:
                param.normal_(0, 0.5, generator=generator)
    return model.eval()


def tiny_model(preset: str, seed: int = 0):
    """A randomly initialised model of a preset in eval mode, with every gate non-zero."""
    import mossvl_lab as ml

    torch.manual_seed(seed)
    model = ml.build_model(ml.config.preset(preset)).eval()
    set_gates_nonzero(model, torch.Generator().manual_seed(seed + 1))
    return model
