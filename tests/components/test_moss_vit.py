"""MossVisionTower: full-size key set and shapes, a loop-based reference from the spec text, frame independence,
merge-window order, mixed frame sizes, hooks and named errors."""

from __future__ import annotations

import math

import pytest
import torch

from mossvl_lab import registry
from mossvl_lab.components.vision.mllama_vit import VisionInputError
from mossvl_lab.components.vision.moss_vit import FrameTokens, MossVisionTower, tokens_for_grid
from mossvl_lab.config import MossVisionConfig
from mossvl_lab.hooks import attach, name_hook_points

D_MODEL = 24
SIDE = 8  # learned position grid of the small config


def small_cfg(**changes) -> MossVisionConfig:
    base = MossVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                            num_position_embeddings=SIDE * SIDE, deepstack_visual_indexes=(1, 2))
    return base.replace(**changes)


def randomise(tower: torch.nn.Module, seed: int = 0) -> None:
    """Init leaves biases at zero and norms at identity; give every parameter a value that matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() >= 2 and "pos_embed" not in name:
                p.copy_(noise / math.sqrt(p[0].numel()))  # unit-scale activations through every linear
            else:
                p.copy_(noise)  # position table, separator


def small_tower(seed: int = 0, **changes) -> MossVisionTower:
    torch.manual_seed(seed)
    tower = MossVisionTower(small_cfg(**changes), D_MODEL).eval()
    randomise(tower, seed)
    return tower


def pixels(grid_thw, seed: int = 1, patch_dim: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grid_thw), patch_dim, generator=g)


# ---------------------------------------------------------------- full size, meta device

def test_full_size_keys_shapes_and_token_count():
    with torch.device("meta"):
        tower = MossVisionTower(MossVisionConfig(), 4096)
        bare = MossVisionTower(MossVisionConfig(separator=False), 4096)
    params = dict(tower.named_parameters())
    # spec §7.2: 339 tensors under model.visual.; the separator is model.separator_token, held by the tower
    assert len(params) == 340 and len(dict(bare.named_parameters())) == 339
    assert set(params) - set(dict(bare.named_parameters())) == {"separator_token"}
    assert not list(tower.buffers())  # nothing outside the checkpoint (RoPE tables are recomputed)
    expected = {
        "patch_embed.proj.weight": (1152, 3, 1, 16, 16), "patch_embed.proj.bias": (1152,),
        "pos_embed.weight": (2304, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152), "blocks.26.attn.qkv.bias": (3456,),
        "blocks.5.attn.proj.weight": (1152, 1152), "blocks.0.norm1.weight": (1152,), "blocks.26.norm2.bias": (1152,),
        "blocks.3.mlp.linear_fc1.weight": (4304, 1152), "blocks.3.mlp.linear_fc2.weight": (1152, 4304),
        "merger.norms.3.weight": (1152,), "merger.norms.0.bias": (1152,),
        "merger.linear_fc1.weight": (18432, 18432), "merger.linear_fc1.bias": (18432,),
        "merger.linear_fc2.weight": (4096, 18432), "merger.linear_fc2.bias": (4096,),
        "separator_token": (4096,),
    }
    assert {k: tuple(params[k].shape) for k in expected} == expected
    assert "merger.norms.4.weight" not in params and "blocks.27.norm1.weight" not in params
    total = sum(p.numel() for p in params.values())
    print(f"MOSS-VL vision tower parameters: {total:,} (incl. separator_token), {len(params)} tensors")
    assert 0.82e9 < total < 0.84e9  # spec §1.1: "vision about 0.83B"

    # spec §2.3 step 7: a 640x352 frame -> 20*11 merged tokens + 1 separator = 221
    grid = torch.tensor([[1, 352 // 16, 640 // 16]])
    out = tower(torch.empty(22 * 40, 768, device="meta"), grid)
    assert isinstance(out, FrameTokens)
    assert tuple(out.states.shape) == (221, 4096) and out.tokens_per_frame == (221,) and out.grids == ((11, 20),)
    assert tokens_for_grid(grid) == [221] and tower.tokens_for_grid(grid) == [221]


def test_registered():
    tower = registry.build("vision", "moss_vit", small_cfg(), D_MODEL)
    assert isinstance(tower, MossVisionTower)


# ---------------------------------------------------------------- slow reference written from the spec text

def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_exact(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _frame_coords(h, w):
    """(row, col) of each packed patch: windows row-major over (h/2, w/2), then the 2x2 window row-major."""
    coords = []
    for wr in range(h // 2):
        for wc in range(w // 2):
            for dr in range(2):
                for dc in range(2):
                    coords.append((2 * wr + dr, 2 * wc + dc))
    return coords


def _lin(n, k):
    return 0.0 if n == 1 else (SIDE - 1) * k / (n - 1)  # linspace(0, SIDE-1, n)[k]


def reference_forward(tower: MossVisionTower, pixel_values: torch.Tensor, grid_thw) -> list[torch.Tensor]:
    """Per frame, per patch loops in float64; returns one [eh*ew + 1, d_model] tensor per frame."""
    cfg = tower.cfg
    P = {k: v.detach().double() for k, v in tower.named_parameters()}
    heads, dh = cfg.num_heads, cfg.head_dim
    rot = dh // 2  # rotary table dim; head_dim/4 frequencies
    inv_freq = [cfg.rope_theta ** (-(2 * j) / rot) for j in range(rot // 2)]
    out, offset = [], 0
    for t, h, w in grid_thw:
        for _ in range(t):
            n = h * w
            px = pixel_values[offset:offset + n].double()
            offset += n
            coords = _frame_coords(h, w)
            # 1. patch embed: Conv3d with kernel = stride = patch is a dot product with each filter
            x = px @ P["patch_embed.proj.weight"].reshape(cfg.hidden_size, -1).T + P["patch_embed.proj.bias"]
            # 2. bilinear sample of the SIDE x SIDE table at each patch
            table = P["pos_embed.weight"]
            pos = []
            for r, c in coords:
                y, z = _lin(h, r), _lin(w, c)
                y0, z0 = math.floor(y), math.floor(z)
                y1, z1 = min(y0 + 1, SIDE - 1), min(z0 + 1, SIDE - 1)
                a, b = y - y0, z - z0
                pos.append((1 - a) * (1 - b) * table[y0 * SIDE + z0] + (1 - a) * b * table[y0 * SIDE + z1]
                           + a * (1 - b) * table[y1 * SIDE + z0] + a * b * table[y1 * SIDE + z1])
            x = x + torch.stack(pos)
            # 3. 2-D RoPE angles per patch
            cos, sin = [], []
            for r, c in coords:
                ang = [r * f for f in inv_freq] + [c * f for f in inv_freq]
                ang = ang + ang
                cos.append([math.cos(a) for a in ang])
                sin.append([math.sin(a) for a in ang])
            cos, sin = torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)

            def rope(v):
                half = v.shape[-1] // 2
                return v * cos + torch.cat([-v[:, half:], v[:, :half]], dim=-1) * sin

            taps = {}
            for i in range(cfg.depth):
                p = lambda k: P[f"blocks.{i}.{k}"]  # noqa: E731
                y = _layer_norm(x, p("norm1.weight"), p("norm1.bias"), cfg.norm_eps)
                qkv = y @ p("attn.qkv.weight").T + p("attn.qkv.bias")
                z = []
                for hd in range(heads):
                    q = rope(qkv[:, hd * dh:(hd + 1) * dh])
                    k = rope(qkv[:, cfg.hidden_size + hd * dh: cfg.hidden_size + (hd + 1) * dh])
                    v = qkv[:, 2 * cfg.hidden_size + hd * dh: 2 * cfg.hidden_size + (hd + 1) * dh]
                    z.append(torch.softmax(q @ k.T / math.sqrt(dh), dim=-1) @ v)
                x = x + torch.cat(z, dim=-1) @ p("attn.proj.weight").T + p("attn.proj.bias")
                y = _layer_norm(x, p("norm2.weight"), p("norm2.bias"), cfg.norm_eps)
                y = _gelu_tanh(y @ p("mlp.linear_fc1.weight").T + p("mlp.linear_fc1.bias"))
                x = x + y @ p("mlp.linear_fc2.weight").T + p("mlp.linear_fc2.bias")
                if i in cfg.deepstack_visual_indexes:
                    taps[i] = x
            sources = [x] + [taps[i] for i in cfg.deepstack_visual_indexes]
            normed = [_layer_norm(s, P[f"merger.norms.{j}.weight"], P[f"merger.norms.{j}.bias"], cfg.norm_eps)
                      for j, s in enumerate(sources)]
            where = {rc: i for i, rc in enumerate(coords)}
            rows = []
            for wr in range(h // 2):  # merged tokens row-major; each gathers its window's 4 patches explicitly
                for wc in range(w // 2):
                    parts = []
                    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
                        idx = where[(2 * wr + dr, 2 * wc + dc)]
                        parts.extend(s[idx] for s in normed)
                    v = _gelu_exact(torch.cat(parts) @ P["merger.linear_fc1.weight"].T + P["merger.linear_fc1.bias"])
                    rows.append(v @ P["merger.linear_fc2.weight"].T + P["merger.linear_fc2.bias"])
            rows.append(P["separator_token"])
            out.append(torch.stack(rows))
    return out


def test_matches_loop_reference():
    tower = small_tower()
    # a downsampled image grid (6 < 8 rows), a 2-frame video, an upsampled non-square grid (10 x 12 > 8)
    grid = [[1, 6, 8], [2, 4, 4], [1, 10, 12]]
    pv = pixels(grid)
    out = tower(pv, torch.tensor(grid))
    ref = reference_forward(tower, pv, grid)
    assert out.tokens_per_frame == tuple(r.shape[0] for r in ref)
    expected = torch.cat(ref).float()
    assert out.states.shape == expected.shape
    diff = (out.states - expected).abs().max().item()
    assert diff <= 1e-5, diff
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero tensors


# ---------------------------------------------------------------- frame independence

def test_frames_never_attend_to_each_other():
    tower = small_tower()
    grid = torch.tensor([[2, 6, 8]])
    pv = pixels(grid.tolist())
    base = tower(pv, grid)
    changed = pv.clone()
    changed[48:] = torch.randn(48, 48)  # frame 2 only
    other = tower(changed, grid)
    n1 = base.tokens_per_frame[0]
    assert torch.equal(base.states[:n1], other.states[:n1])
    assert not torch.allclose(base.states[n1:], other.states[n1:])

    one_a = tower(pv[:48], torch.tensor([[1, 6, 8]]))
    one_b = tower(pv[48:], torch.tensor([[1, 6, 8]]))
    # one call vs one call per frame: same math, only the packed matmul sizes differ (fp32 rounding, which also
    # depends on the thread count: 1.3e-6 seen with one thread)
    torch.testing.assert_close(base.states, torch.cat([one_a.states, one_b.states]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- merge-window order

def test_merged_row_combines_its_window_in_order():
    """Blocks made identity, patch p embeds to one-hot e_p, norm j adds 10*j: the merger input of row k must read
    [p0(final, tap1, tap2), p1(...), p2(...), p3(...)] with p_i the 4 patches of window k."""
    cfg = small_cfg(intermediate_size=8)
    tower = MossVisionTower(cfg, D_MODEL).eval()
    d = cfg.hidden_size
    h, w = 4, 8  # 32 patches = hidden size: one one-hot direction per patch
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if ".attn.proj." in name or ".mlp.linear_fc2." in name or name.startswith("pos_embed"):
                p.zero_()  # residual branches and positions contribute nothing
        tower.patch_embed.proj.weight.copy_(torch.eye(d, cfg.patch_dim).view_as(tower.patch_embed.proj.weight))
        tower.patch_embed.proj.bias.zero_()
        for j, norm in enumerate(tower.merger.norms):
            norm.weight.fill_(1.0)
            norm.bias.fill_(10.0 * j)
    # patch id = its row-major grid index; pack in processor order (h/2, w/2, 2, 2) by explicit loops
    packed_ids = [r * w + c for r, c in _frame_coords(h, w)]
    pv = torch.zeros(h * w, cfg.patch_dim)
    pv[torch.arange(h * w), torch.tensor(packed_ids)] = 1.0

    seen = {}
    handle = tower.merger.linear_fc1.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            tower(pv, torch.tensor([[1, h, w]]))
    finally:
        handle.remove()
    x = seen["x"]  # [merged, merger_input_dim]
    assert x.shape == (h * w // 4, cfg.merger_input_dim)
    k = 0
    for wr in range(h // 2):
        for wc in range(w // 2):
            chunks = x[k].view(4, 3, d)  # [window patch, source, d_vision]
            for i, (dr, dc) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                patch_id = (2 * wr + dr) * w + (2 * wc + dc)
                for j in range(3):
                    centred = chunks[i, j] - 10.0 * j
                    assert int(centred.argmax()) == patch_id
                    assert abs(float(chunks[i, j].mean()) - 10.0 * j) < 1e-4
            k += 1


# ---------------------------------------------------------------- mixed sizes, separators, hooks

def test_mixed_frame_sizes_in_one_call():
    tower = small_tower()
    # an image of 64x96 px (16 x 24 patches of 4 px) and a 2-frame 32x32 px video (8 x 8 patches)
    grid = torch.tensor([[1, 64 // 4, 96 // 4], [2, 32 // 4, 32 // 4]])
    out = tower(pixels(grid.tolist()), grid)
    assert out.grids == ((8, 12), (4, 4), (4, 4))
    assert out.tokens_per_frame == (97, 17, 17) == tuple(tokens_for_grid(grid))
    assert out.states.shape == (131, D_MODEL)
    for end in (97, 114, 131):  # each frame ends with the separator
        assert torch.equal(out.states[end - 1], tower.separator_token.detach())
    assert not torch.equal(out.states[95], tower.separator_token.detach())

    bare = small_tower(separator=False)
    out = bare(pixels(grid.tolist()), grid)
    assert out.tokens_per_frame == (96, 16, 16) and out.states.shape == (128, D_MODEL)
    assert not hasattr(bare, "separator_token")


def test_hooks_names_shapes_and_replacement():
    tower = small_tower()
    points = name_hook_points(tower)
    assert list(points) == ["hook_patch_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(4)] + \
        ["hook_frame_tokens"]
    grid = torch.tensor([[1, 6, 8], [2, 4, 4]])
    pv = pixels(grid.tolist())
    plain = tower(pv, grid).states
    shapes = {}
    record = lambda x, hook: shapes.__setitem__(hook.name, tuple(x.shape))  # noqa: E731
    with attach(points, [("*", record)]):
        hooked = tower(pv, grid).states
    assert torch.equal(plain, hooked)  # recording hooks change nothing
    assert shapes["hook_patch_embed"] == (80, 32) and shapes["blocks.3.hook_resid_post"] == (80, 32)
    assert shapes["hook_frame_tokens"] == (12 + 1 + 2 * (4 + 1), D_MODEL)
    with attach(points, [("hook_frame_tokens", lambda x, hook: torch.zeros_like(x))]):
        assert torch.equal(tower(pv, grid).states, torch.zeros_like(plain))


# ---------------------------------------------------------------- named errors

@pytest.mark.parametrize("pv_shape, grid, match", [
    ((48, 48, 1), [[1, 6, 8]], "pixel_values must be"),
    ((48, 47), [[1, 6, 8]], "patch_dim=48"),
    ((48, 48), [1, 6, 8], "grid_thw must be"),
    ((48, 48), [[1, 6, 8, 1]], "grid_thw must be"),
    ((30, 48), [[1, 5, 6]], r"frame grid 5x6 is not divisible by the merge size 2; resize frames to multiples of "
                            r"8 pixels \(smart_resize\)"),
    ((48, 48), [[1, 4, 8]], r"describes 32 patches .* pixel_values has 48"),
    ((0, 48), [[0, 4, 8]], "non-positive"),
])
def test_named_errors(pv_shape, grid, match):
    tower = small_tower()
    with pytest.raises(VisionInputError, match=match):
        tower(torch.zeros(pv_shape), torch.tensor(grid))


def test_full_size_divisibility_message():
    with torch.device("meta"):
        tower = MossVisionTower(MossVisionConfig(), 64)
    with pytest.raises(VisionInputError, match=r"frame grid 22x41 is not divisible by the merge size 2; resize frames "
                                               r"to multiples of 32 pixels \(smart_resize\)"):
        tower(torch.empty(22 * 41, 768, device="meta"), torch.tensor([[1, 22, 41]]))
