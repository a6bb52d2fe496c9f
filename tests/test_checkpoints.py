"""Checkpoint I/O: hub-layout safetensors (single + sharded), key maps, manifests and the named errors.

The save/load mechanics run twice: on a small stand-in module with our attribute layout (so they hold while
model.py changes) and on the real `build_model` (skipped while model.py is not importable). The tests against
transformers' own checkpoints and the 11B key list need the real model.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mossvl_lab import checkpoints as ck
from mossvl_lab.config import preset
from mossvl_lab.hf_config import from_hf_dict


# ---------------------------------------------------------------------------------------------------------------
# A stand-in with the real model's attribute layout: vision (+ projector), embed_tokens, blocks, norm, lm_head and a
# non-persistent rotary buffer.

class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))


class _Block(nn.Module):
    def __init__(self, d: int, d_head: int, cross: bool) -> None:
        super().__init__()
        self.input_layernorm = _Norm(d)
        attn = nn.Module()
        attn.q_proj = nn.Linear(d, d, bias=False)
        if cross:
            attn.k_norm = _Norm(d_head)
            self.cross_attn = attn
            self.cross_attn_attn_gate = nn.Parameter(torch.randn(1))
        else:
            self.self_attn = attn
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, 2 * d, bias=False)


class StandInModel(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        t, v = cfg.text, cfg.vision
        self.vision = nn.Module()
        self.vision.class_embedding = nn.Parameter(torch.randn(v.hidden_size))
        self.vision.transformer = nn.Module()
        self.vision.transformer.layers = nn.ModuleList(_Block(v.hidden_size, 8, False) for _ in range(v.num_layers))
        self.vision.multi_modal_projector = nn.Linear(v.vision_output_dim, t.hidden_size)
        self.embed_tokens = nn.Embedding(t.embedding_rows, t.hidden_size)
        self.blocks = nn.ModuleList(_Block(t.hidden_size, t.d_head, i in t.cross_attention_layers)
                                    for i in range(t.num_layers))
        self.norm = _Norm(t.hidden_size)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = 1.0 / (t.rope.theta ** (torch.arange(0, t.d_head, 2).float() / t.d_head))
        self.register_buffer("inv_freq", inv_freq, persistent=False)


def stand_in_build(cfg, device=None, dtype=None):
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = StandInModel(cfg)
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(params=["stand-in", "real"])
def build(request, monkeypatch):
    """The builder under test; load_model is pointed at it too."""
    if request.param == "real":
        fn = pytest.importorskip("mossvl_lab.model").build_model
    else:
        fn = stand_in_build
    monkeypatch.setattr(ck, "_build_model", lambda cfg, device, dtype: fn(cfg, device=device, dtype=dtype))
    return fn


def _tied(cfg):
    return cfg.replace(text=cfg.text.replace(tie_word_embeddings=True))


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for name in ba:
        assert bb[name].device.type != "meta", name
        assert ba[name].dtype == bb[name].dtype and torch.equal(ba[name], bb[name]), name


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["mllama-tiny", "video-preview-tiny"])
def test_single_file_round_trip_is_bit_identical(build, tmp_path, name):
    model = build(preset(name))
    ck.save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(ck.checkpoint_manifest(model))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mllama" and config["dtype"] == "float32"
    assert config["mossvl_lab"] == model.config.to_dict()
    loaded = ck.load_model(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    _assert_same_state(model, loaded)
    _assert_same_buffers(build(model.config), loaded)  # non-persistent rope tables rebuilt, not left on meta


def test_sharded_round_trip(build, tmp_path, capsys):
    model = build(preset("mllama-tiny"))
    manifest = ck.checkpoint_manifest(model)
    sizes = {k: t.numel() * t.element_size() for k, t in zip(manifest, ck._unique_state(model)[0].values())}
    total = sum(sizes.values())
    ck.save_model(model, tmp_path, max_shard_bytes=total // 4)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(manifest)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 4
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files + ["config.json",
                                                                         "model.safetensors.index.json"])
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == file}
            assert f.metadata() == {"format": "pt"}
            shard = sum(sizes[k] for k in f.keys())
            # a shard only exceeds the limit when it holds a single oversized tensor
            assert shard <= total // 4 or len(f.keys()) == 1

    capsys.readouterr()
    loaded = ck.load_model(tmp_path)
    assert "loading shards" in capsys.readouterr().err  # tqdm bar over shards
    _assert_same_state(model, loaded)
    _assert_same_buffers(build(model.config), loaded)

    # saving again into the same directory drops the stale shards and index
    ck.save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_state(model, ck.load_model(tmp_path))


def test_dtype_conversion_on_load(build, tmp_path):
    model = build(preset("video-preview-tiny"))
    ck.save_model(model, tmp_path)
    loaded = ck.load_model(tmp_path, dtype=torch.bfloat16)
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    # buffers as the builder makes them for that dtype (the real model keeps rope tables in fp32)
    _assert_same_buffers(build(model.config, dtype=torch.bfloat16), loaded)


def test_bf16_model_is_saved_in_bf16(build, tmp_path):
    model = build(preset("mllama-tiny"), dtype=torch.bfloat16)
    ck.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    _assert_same_state(model, ck.load_model(tmp_path))


def test_tied_embeddings_are_stored_once_and_retied(build, tmp_path):
    model = build(_tied(preset("mllama-tiny")))
    manifest = ck.checkpoint_manifest(model)
    assert "language_model.lm_head.weight" not in manifest
    assert "language_model.model.embed_tokens.weight" in manifest
    ck.save_model(model, tmp_path)
    loaded = ck.load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    _assert_same_state(model, loaded)
    # an exporter that writes the tied head anyway is accepted; the tie decides its value
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["language_model.lm_head.weight"] = torch.zeros_like(tensors["language_model.model.embed_tokens.weight"])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = ck.load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_read_hub_tensors_converts_floating_tensors_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.randn(3), "ids": torch.arange(4)}, str(tmp_path / "model.safetensors"))
    out = ck.read_hub_tensors(tmp_path, dtype=torch.float16)
    assert out["a"].dtype == torch.float16 and out["ids"].dtype == torch.int64
    assert torch.equal(out["ids"], torch.arange(4))


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_mismatch_lists_missing_unexpected_and_misshaped_together(build, tmp_path, monkeypatch):
    model = build(preset("mllama-tiny"))
    ck.save_model(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    missing = "language_model.model.layers.1.cross_attn.k_norm.weight"
    misshaped = "multi_modal_projector.weight"
    unexpected = "language_model.model.layers.9.mlp.gate_proj.weight"
    del tensors[missing]
    expected_shape = tuple(tensors[misshaped].shape)
    tensors[misshaped] = torch.zeros(3, 5)
    tensors[unexpected] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was read before validation")

    monkeypatch.setattr(ck, "read_hub_tensors", no_data)
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.load_model(tmp_path)
    err, message = info.value, str(info.value)
    assert isinstance(err, ValueError)
    for key in (missing, unexpected, misshaped):
        assert key in message
    assert f"expected {expected_shape}, found (3, 5)" in message
    assert "1 missing" in message and "1 unexpected" in message and "1 mis-shaped" in message
    assert (err.missing, err.unexpected) == ([missing], [unexpected])
    assert err.mismatched == {misshaped: (expected_shape, (3, 5))}


def test_wrong_config_summarises_hundreds_of_keys(build, tmp_path):
    """Weights of one size under a config of another: every key is reported, grouped by layer pattern."""
    cfg = preset("mllama-tiny")
    model = build(cfg)
    ck.save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mossvl_lab"]["text"].update(hidden_size=32, num_layers=7)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ck.CheckpointMismatchError) as info:
        ck.load_model(tmp_path)
    err, message = info.value, str(info.value)
    assert len(err.missing) > 0 and len(err.mismatched) > 10
    assert f"{len(err.mismatched)} mis-shaped" in message
    assert "language_model.model.layers.*.mlp.gate_proj.weight" in message  # collapsed pattern with its indices
    assert "language_model.model.layers.5" in message or "* = 5-6" in message  # the two extra layers


def test_dir_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ck.CheckpointNotFoundError) as info:
        ck.load_model(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert "config.json" in str(info.value) and "model.safetensors" in str(info.value)
    with pytest.raises(ck.CheckpointNotFoundError, match="does not exist"):
        ck.load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ck.CheckpointNotFoundError, match="empty directory"):
        ck.load_model(empty)


def test_config_without_weights(tmp_path):
    model = stand_in_build(preset("mllama-tiny"))
    ck.save_model(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ck.CheckpointNotFoundError, match="model.safetensors"):
        ck.load_model(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ck.UnsupportedModelTypeError, match="mllama"):
        ck.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Key maps and manifests


def test_key_map_examples():
    assert ck.to_hub_key("mllama", "vision.multi_modal_projector.weight") == "multi_modal_projector.weight"
    assert ck.to_hub_key("video_preview", "vision.transformer.layers.0.self_attn.q_proj.weight") == \
        "vision_model.transformer.layers.0.self_attn.q_proj.weight"
    assert ck.to_hub_key("mllama", "blocks.3.cross_attn_attn_gate") == \
        "language_model.model.layers.3.cross_attn_attn_gate"
    assert ck.to_hub_key("mllama", "norm.weight") == "language_model.model.norm.weight"
    assert ck.from_hub_key("mllama", "language_model.lm_head.weight") == "lm_head.weight"
    with pytest.raises(ck.UnmappedKeyError, match="rope.inv_freq"):
        ck.to_hub_key("mllama", "rope.inv_freq")
    assert ck.to_hub_key("moss_vl", "lm_head.weight") == "lm_head.weight"
    assert ck.to_hub_key("moss_vl", "vision.separator_token") == "model.separator_token"
    assert ck.to_hub_key("moss_vl", "vision.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert ck.from_hub_key("moss_vl", "model.language_model.layers.2.cross_attn.k_norm.weight") == \
        "blocks.2.cross_attn.k_norm.weight"


@pytest.mark.parametrize("name", ["mllama-tiny", "video-preview-tiny", "moss-video-preview-11b"])
def test_manifest_on_meta_and_key_map_round_trip(build, name):
    cfg = preset(name)
    meta = build(cfg, device="meta")
    manifest = ck.checkpoint_manifest(meta)
    ours = [n for n, _ in meta.named_parameters()]
    assert len(manifest) == len(ours)
    for key in manifest:
        assert ck.to_hub_key(cfg.family, ck.from_hub_key(cfg.family, key)) == key
    assert [ck.from_hub_key(cfg.family, k) for k in manifest] == ours
    if name.endswith("tiny"):  # a real build agrees with the meta one
        assert ck.checkpoint_manifest(build(cfg)) == manifest


# ---------------------------------------------------------------------------------------------------------------
# Against transformers and the published key list (real model only)


def _tiny_transformers_mllama():
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 3], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=96, image_size=56, patch_size=7, intermediate_layers_indices=[1, 3])
    config = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=256)
    return transformers.MllamaForConditionalGeneration(config).eval()


def test_transformers_checkpoint_has_exactly_our_hub_keys(tmp_path):
    build_model = pytest.importorskip("mossvl_lab.model").build_model
    _tiny_transformers_mllama().save_pretrained(tmp_path)
    cfg = from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert ck.checkpoint_manifest(build_model(cfg, device="meta")) == written

    loaded = ck.load_model(tmp_path)
    reference = load_file(str(tmp_path / "model.safetensors"))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[ck.to_hub_key(cfg.family, name)]), name


def _published_11b_keys() -> dict[str, tuple[int, ...]]:
    """Spec §9: the Llama-3.2-11B-Vision / MOSS-Video-Preview hub keys and shapes, written out independently."""
    keys: dict[str, tuple[int, ...]] = {
        "vision_model.patch_embedding.weight": (1280, 3, 14, 14), "vision_model.class_embedding": (1280,),
        "vision_model.gated_positional_embedding.embedding": (1601, 1280),
        "vision_model.gated_positional_embedding.gate": (1,),
        "vision_model.gated_positional_embedding.tile_embedding.weight": (9, 8197120),
        "multi_modal_projector.weight": (4096, 7680), "multi_modal_projector.bias": (4096,),
        "language_model.model.embed_tokens.weight": (128264, 4096), "language_model.model.norm.weight": (4096,),
        "language_model.lm_head.weight": (128256, 4096)}
    for side in ("pre", "post"):
        keys[f"vision_model.{side}_tile_positional_embedding.embedding.weight"] = (9, 5120)
        keys[f"vision_model.{side}_tile_positional_embedding.gate"] = (1,)
        keys[f"vision_model.layernorm_{side}.weight"] = keys[f"vision_model.layernorm_{side}.bias"] = (1280,)
    for stack, n in (("transformer", 32), ("global_transformer", 8)):
        for i in range(n):
            p = f"vision_model.{stack}.layers.{i}."
            keys.update({p + f"self_attn.{x}_proj.weight": (1280, 1280) for x in "qkvo"})
            keys.update({p + "mlp.fc1.weight": (5120, 1280), p + "mlp.fc1.bias": (5120,),
                         p + "mlp.fc2.weight": (1280, 5120), p + "mlp.fc2.bias": (1280,)})
            for norm in ("input_layernorm", "post_attention_layernorm"):
                keys[p + f"{norm}.weight"] = keys[p + f"{norm}.bias"] = (1280,)
            if stack == "global_transformer":
                keys[p + "gate_attn"] = keys[p + "gate_ffn"] = (1,)
    for i in range(40):
        p = f"language_model.model.layers.{i}."
        cross = i in (3, 8, 13, 18, 23, 28, 33, 38)
        attn = "cross_attn" if cross else "self_attn"
        keys.update({p + f"{attn}.q_proj.weight": (4096, 4096), p + f"{attn}.k_proj.weight": (1024, 4096),
                     p + f"{attn}.v_proj.weight": (1024, 4096), p + f"{attn}.o_proj.weight": (4096, 4096),
                     p + "mlp.gate_proj.weight": (14336, 4096), p + "mlp.up_proj.weight": (14336, 4096),
                     p + "mlp.down_proj.weight": (4096, 14336), p + "input_layernorm.weight": (4096,),
                     p + "post_attention_layernorm.weight": (4096,)})
        if cross:
            keys.update({p + "cross_attn.q_norm.weight": (128,), p + "cross_attn.k_norm.weight": (128,),
                         p + "cross_attn_attn_gate": (1,), p + "cross_attn_mlp_gate": (1,)})
    return keys


@pytest.mark.parametrize("name", ["moss-video-preview-11b", "mllama-11b"])
def test_11b_manifest_matches_published_key_list(name):
    build_model = pytest.importorskip("mossvl_lab.model").build_model
    assert ck.checkpoint_manifest(build_model(preset(name), device="meta")) == _published_11b_keys()


def test_load_builds_parameters_on_meta_only(build, tmp_path, monkeypatch):
    """Loading never allocates a random-init copy: the builder runs once, with every parameter on meta."""
    model = build(preset("video-preview-tiny"))
    ck.save_model(model, tmp_path)
    seen = []

    def recording_build(cfg, device, dtype):
        built = build(cfg, device=device, dtype=dtype)
        seen.append({p.device.type for p in built.parameters()})
        return built

    monkeypatch.setattr(ck, "_build_model", recording_build)
    _assert_same_state(model, ck.load_model(tmp_path))
    assert seen == [{"meta"}]


def test_saving_a_meta_model_is_refused(build, tmp_path):
    with pytest.raises(ValueError, match="meta"):
        ck.save_model(build(preset("mllama-tiny"), device="meta"), tmp_path)


@pytest.mark.gpu
def test_load_onto_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    build_model = pytest.importorskip("mossvl_lab.model").build_model
    model = build_model(preset("video-preview-tiny"))
    ck.save_model(model, tmp_path)
    loaded = ck.load_model(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cuda"}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.cpu(), model.state_dict()[name].to(torch.bfloat16)), name
    _assert_same_buffers(build_model(model.config, device="cuda", dtype=torch.bfloat16), loaded)
