"""Vision towers: real-size parameter counts on meta, pretrained loading in timm / open_clip / OpenAI layouts,
LoRA, locking, layer-wise lr decay and gradient checkpointing — all on tiny CPU models except the meta counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llm2clip_scale.config.schema import AdapterConfig, ModelConfig, VisionConfig
from llm2clip_scale.models.clip import build_clip_model
from llm2clip_scale.models.vision import timm_tower
from llm2clip_scale.models.vision.param_groups import build_param_groups
from llm2clip_scale.models.vision.pretrained import detect_format, load_pretrained_trunk, read_checkpoint
from llm2clip_scale.models.vision.timm_tower import LoRALinear, VisionTower, build_vision_tower, count_parameters

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
IMG = 32
EMBED = 16

# timm name -> (image size, exact trunk parameters measured with timm 1.0.31, published figure).
# Trunk = everything but the original projection/classifier (LLM2CLIP replaces it with a fresh head).
REAL_TOWERS = {
    # EVA-CLIP paper, EVA-02-CLIP-E/14(+): 4.4B image encoder; measured 4.349B (-1.2%).
    "eva02_enormous_patch14_clip_224": (224, 4_348_720_896, 4.4e9),
    # SigLIP So400m/14 ("Getting ViT in Shape"): 428M incl. the attention-pool head; measured 427.7M / 428.2M.
    "vit_so400m_patch14_siglip_224": (224, 427_680_704, 428e6),
    "vit_so400m_patch14_siglip_384": (384, 428_225_600, 428e6),
    # InternViT-300M-448px: 304M (0.3B); measured 304.0M.
    "vit_intern300m_patch14_448": (448, 304_012_288, 304e6),
    # OpenAI CLIP ViT-L/14@336 image tower: 304M with its 1024x768 proj (0.79M) that we drop; measured 303.5M.
    "vit_large_patch14_clip_336": (336, 303_507_456, 304e6),
    # EVA02-CLIP-L/14@336: 304M; measured 303.6M.
    "eva02_large_patch14_clip_336": (336, 303_645_632, 304e6),
}
PUBLISHED_RTOL = 0.02


def tiny_cfg(name: str = "vit_large_patch14_clip_336", **options: object) -> VisionConfig:
    return VisionConfig(**{"name": name, "image_size": IMG, "timm_kwargs": dict(TINY), **options})


def tiny_source(name: str, seed: int = 0, **overrides: object) -> nn.Module:
    """The 'pretrained' model: a tiny timm trunk with randomised (not default-init) weights everywhere."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=IMG, **{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # norms/biases away from 1/0 so a skipped tensor is visible
    return model.eval()


def images(seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def assert_same_trunk(tower: VisionTower, source: nn.Module) -> None:
    tower.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(tower.forward_features(x), source.forward_features(x))
        assert torch.equal(tower.trunk(x), source(x))
        assert tower(x).shape == (2, EMBED)


def openai_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI CLIP visual keys built by hand from a tiny timm CLIP ViT (the inverse of timm's converter)."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["patch_embed.proj.weight"],
        "visual.class_embedding": sd["cls_token"].reshape(-1),
        "visual.positional_embedding": sd["pos_embed"][0],
        "visual.ln_pre.weight": sd["norm_pre.weight"],
        "visual.ln_pre.bias": sd["norm_pre.bias"],
        "visual.ln_post.weight": sd["norm.weight"],
        "visual.ln_post.bias": sd["norm.bias"],
        "visual.proj": torch.randn(TINY["embed_dim"], 24),
    }
    names = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv.weight": "attn.in_proj_weight",
        "attn.qkv.bias": "attn.in_proj_bias",
        "attn.proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in names.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            out[f"visual.transformer.resblocks.{i}.{rest}"] = v
    assert len(out) == len(sd) + 1  # + proj: every trunk tensor has an OpenAI counterpart
    return out


def text_tower(prefix: str = "") -> dict[str, torch.Tensor]:
    """Text-tower keys of a full CLIP checkpoint; note the top-level positional_embedding clash with the visual one."""
    return {
        f"{prefix}token_embedding.weight": torch.randn(50, 32),
        f"{prefix}positional_embedding": torch.randn(77, 32),
        f"{prefix}transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
        f"{prefix}transformer.resblocks.0.ln_1.weight": torch.randn(32),
        f"{prefix}ln_final.weight": torch.randn(32),
        f"{prefix}text_projection": torch.randn(32, 24),
        "logit_scale": torch.ones([]),
    }


class _ScriptRoot(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive with the given state-dict keys, like OpenAI's released ViT-L-14-336px.pt."""
    root = _ScriptRoot()
    for key, v in sd.items():
        *parents, leaf = key.split(".")
        m: nn.Module = root
        for name in parents:
            if not hasattr(m, name):
                m.add_module(name, nn.Module())
            m = getattr(m, name)
        m.register_parameter(leaf, nn.Parameter(v.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


# ---------------------------------------------------------------------------------------------------- meta counts


class _RealAllocations(TorchDispatchMode):
    """Counts the bytes of every tensor an op returns off the meta device, and stops the build at the first
    non-trivial one: a tower built on CPU and then moved to meta fails here at its first layer, not after 17 GB."""

    LIMIT = 1 << 16  # timm's drop-path schedules (torch.linspace over the depth) are the only real tensors

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self.bytes += tensor.untyped_storage().nbytes()
                if self.bytes > self.LIMIT:
                    raise AssertionError(f"{func} allocated {tuple(tensor.shape)} on {tensor.device} during a meta "
                                         f"build ({self.bytes} bytes so far)")
        return out


def test_real_towers_on_meta_have_published_parameter_counts() -> None:
    for name, (size, expected, published) in REAL_TOWERS.items():
        cfg = VisionConfig(name=name, image_size=size, pretrained_path="/nonexistent/weights.safetensors")
        # Six real-size towers including the 4.35B ViT-E: built without allocating parameters (nor, with it, init
        # compute: every op ran on meta), and the pretrained file is not opened (it does not exist).
        with _RealAllocations() as allocations:
            tower = build_vision_tower(cfg, embed_dim=1280, device="meta")
        assert allocations.bytes <= _RealAllocations.LIMIT, name
        assert all(t.is_meta for t in (*tower.parameters(), *tower.buffers()))
        trunk = count_parameters(tower.trunk)
        assert trunk == expected, (name, trunk)
        assert abs(trunk - published) / published < PUBLISHED_RTOL, (name, trunk, published)
        assert count_parameters(tower.head) == tower.feature_dim * 1280 + 1280
        assert (getattr(tower.trunk, "attn_pool", None) is not None) == ("so400m" in name)


def test_siglip_keeps_attention_pool_and_only_replaces_projection() -> None:
    tower = build_vision_tower(tiny_cfg("vit_so400m_patch14_siglip_224"), EMBED)
    assert type(tower.trunk.attn_pool).__name__ == "AttentionPoolLatent"
    assert isinstance(tower.trunk.head, nn.Identity)
    assert (tower.head.in_features, tower.head.out_features) == (TINY["embed_dim"], EMBED)


@pytest.mark.parametrize("name", list(REAL_TOWERS) + ["vit_tiny_patch16_224"])
def test_tiny_towers_forward(name: str) -> None:
    tower = build_vision_tower(tiny_cfg(name), EMBED)
    out = tower(images())
    assert out.shape == (2, EMBED) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(REAL_TOWERS))
def test_bf16_towers_forward_like_fp32(name: str) -> None:
    """Built in bf16 (stage 2's training dtype), every tower runs — EVA's zero k_bias buffer joins its bf16 q/v
    biases — and stays within bf16 rounding of the same weights in fp32; buffers such as RoPE tables stay fp32."""
    torch.manual_seed(0)
    fp32 = build_vision_tower(tiny_cfg(name), EMBED)
    torch.manual_seed(0)
    bf16 = build_vision_tower(tiny_cfg(name), EMBED, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for n, b in bf16.named_buffers() if not n.endswith("k_bias"))
    with torch.no_grad():
        expected, got = fp32(images()), bf16(images().to(torch.bfloat16)).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()  # bf16: 8 mantissa bits over a few layers


def test_clip_model_still_builds_and_runs() -> None:
    cfg = ModelConfig(embed_dim=EMBED, vision=tiny_cfg(), adapter=AdapterConfig(input_dim=32, num_blocks=1))
    model = build_clip_model(cfg)
    img, txt, scale, bias = model(images(), torch.randn(2, 32))
    assert img.shape == txt.shape == (2, EMBED)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2))
    assert scale.ndim == 0 and bias is None  # InfoNCE: no logit bias

    siglip = build_clip_model(dataclasses.replace(cfg, logit_bias_init=-10.0))
    assert siglip(images(), torch.randn(2, 32))[3].item() == -10.0


# ------------------------------------------------------------------------------------------------ pretrained load


@pytest.mark.parametrize(
    "name", ["vit_large_patch14_clip_336", "eva02_enormous_patch14_clip_224", "eva02_large_patch14_clip_336"]
)
def test_load_timm_safetensors(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_source(name)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    reinit_calls: list[nn.Module] = []
    real_reinit = timm_tower.reinit_non_persistent_buffers
    monkeypatch.setattr(timm_tower, "reinit_non_persistent_buffers", lambda m: reinit_calls.append(m) or real_reinit(m))
    tower = build_vision_tower(tiny_cfg(name, pretrained_path=str(path)), EMBED)
    # Built on meta and materialised from the checkpoint (no random init), RoPE / k_bias buffers recomputed:
    # the exact match below also covers EVA02-L's rotary tables.
    assert reinit_calls == [tower.trunk]
    assert_same_trunk(tower, source)
    report = tower.load_pretrained(str(path))
    assert report.format == "timm" and not report.missing and not report.unexpected
    assert report.expected_missing == ["head.weight", "head.bias"]


def test_timm_safetensors_stream_into_a_bf16_tower_without_a_whole_file_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ViT-E-sized start-up: the trunk is allocated once, in the target dtype, and filled tensor by tensor from the
    file — never a whole-file read (monkeypatched to fail) and never an fp32 model first. The classifier head in the
    file is dropped as the whole-file path drops it; the fresh head is the fp32 init, rounded once."""
    from llm2clip_scale.models.vision import pretrained

    name = "eva02_enormous_patch14_clip_224"
    source = tiny_source(name)
    path = tmp_path / "w.safetensors"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file({**state, "head.weight": torch.randn(10, source.num_features), "head.bias": torch.zeros(10)}, str(path))
    torch.manual_seed(3)
    fp32 = build_vision_tower(tiny_cfg(name, pretrained_path=str(path)), EMBED)

    def whole_file_read(path: object) -> None:
        raise AssertionError(f"{path} read whole")

    monkeypatch.setattr(pretrained, "read_checkpoint", whole_file_read)
    torch.manual_seed(3)
    bf16 = build_vision_tower(tiny_cfg(name, pretrained_path=str(path)), EMBED, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for key, value in bf16.trunk.state_dict().items():
        assert torch.equal(value, state[key].to(value.dtype)), key  # one rounding of the file's fp32 tensor
    assert torch.equal(bf16.head.weight, fp32.head.weight.to(torch.bfloat16))
    report = bf16.load_pretrained(str(path))
    assert report.loaded == sorted(state) and report.dropped == ["head.bias", "head.weight"] and not report.missing


def test_load_timm_pt_with_classifier_head_drops_it(tmp_path: Path) -> None:
    # As timm saves a model trained with a classifier: head.* exists in the file but not in our trunk.
    source = tiny_source("vit_large_patch14_clip_336")
    sd = {**source.state_dict(), "head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}
    path = tmp_path / "w.pth"
    torch.save({"model": sd, "epoch": 7}, path)
    tower = build_vision_tower(tiny_cfg(), EMBED)
    report = tower.load_pretrained(str(path))
    assert report.dropped == ["head.bias", "head.weight"]
    assert_same_trunk(tower, source)


def test_load_openai_layout_full_clip_checkpoint(tmp_path: Path) -> None:
    source = tiny_source("vit_large_patch14_clip_336")
    full = {**openai_layout(source), **text_tower()}
    # open_clip .pt: {"epoch", "state_dict"} with DDP's module. prefix on every key.
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.items()}}, path)
    assert detect_format(read_checkpoint(path)) == "openai"
    tower = build_vision_tower(tiny_cfg(pretrained_path=str(path)), EMBED)
    assert_same_trunk(tower, source)
    report = load_pretrained_trunk(tower.trunk, path)
    assert report.format == "openai" and not report.missing and not report.unexpected
    # Text tower and the original projection (converted by timm to head.*) are dropped, not loaded.
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"} <= set(report.dropped)
    assert "head.weight" in report.dropped


def test_load_openai_torchscript_archive(tmp_path: Path) -> None:
    source = tiny_source("vit_large_patch14_clip_336")
    path = tmp_path / "ViT-L-14-336px.pt"
    save_torchscript({**openai_layout(source), **text_tower()}, path)
    tower = build_vision_tower(tiny_cfg(pretrained_path=str(path)), EMBED)
    assert_same_trunk(tower, source)


@pytest.mark.parametrize("name", ["vit_so400m_patch14_siglip_224", "eva02_large_patch14_clip_336"])
def test_load_open_clip_timm_trunk_checkpoint(tmp_path: Path, name: str) -> None:
    source = tiny_source(name)
    full = {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}
    full["visual.head.proj.weight"] = torch.randn(24, 64)
    full.update(text_tower("text."))
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    tower = build_vision_tower(tiny_cfg(name, pretrained_path=str(path)), EMBED)
    assert_same_trunk(tower, source)  # includes SigLIP's attention pool
    report = tower.load_pretrained(str(path))
    assert report.format == "open_clip" and not report.missing and not report.unexpected
    assert "visual.head.proj.weight" in report.dropped and "text.token_embedding.weight" in report.dropped


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_vision_tower(tiny_cfg(pretrained_path=str(missing)), EMBED)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path: Path) -> None:
    source = tiny_source("vit_large_patch14_clip_336", mlp_ratio=2.0)  # fc1 64->128 instead of 64->256
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as err:
        build_vision_tower(tiny_cfg(pretrained_path=str(path)), EMBED)
    msg = str(err.value)
    assert "blocks.0.mlp.fc1.weight" in msg and "(128, 64)" in msg and "(256, 64)" in msg


def test_missing_and_unexpected_keys_strict_and_lenient(tmp_path: Path) -> None:
    source = tiny_source("vit_large_patch14_clip_336")
    sd = dict(source.state_dict())
    del sd["blocks.1.norm2.weight"]
    sd["blocks.1.extra_gate"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.norm2\.weight.*blocks\.1\.extra_gate"):
        build_vision_tower(tiny_cfg(pretrained_path=str(path)), EMBED)
    tower = build_vision_tower(tiny_cfg(pretrained_path=str(path), pretrained_strict=False), EMBED)
    report = tower.load_pretrained(str(path), strict=False)
    assert report.missing == ["blocks.1.norm2.weight"] and report.unexpected == ["blocks.1.extra_gate"]
    assert torch.equal(tower.trunk.blocks[1].norm1.weight, source.blocks[1].norm1.weight)


# --------------------------------------------------------------------------------------------------- lock / LoRA


def trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_lock_freezes_trunk_and_keeps_head() -> None:
    tower = build_vision_tower(tiny_cfg("vit_so400m_patch14_siglip_224", lock=True), EMBED)
    assert trainable(tower) == {"head.weight", "head.bias"}


def test_lock_unlocked_groups_unfreezes_last_blocks_and_pooling() -> None:
    cfg = tiny_cfg("vit_so400m_patch14_siglip_224", lock=True, lock_unlocked_groups=1)
    names = trainable(build_vision_tower(cfg, EMBED))
    assert {n for n in names if n.startswith("trunk.blocks.")} == {
        n for n, _ in build_vision_tower(cfg, EMBED).named_parameters() if n.startswith("trunk.blocks.1.")
    }
    assert {"trunk.norm.weight", "trunk.attn_pool.latent", "trunk.attn_pool.q.weight", "head.weight"} <= names
    assert not any(n.startswith(("trunk.blocks.0.", "trunk.patch_embed", "trunk.pos_embed")) for n in names)
    with pytest.raises(ValueError, match="lock_unlocked_groups"):
        build_vision_tower(tiny_cfg(lock=True, lock_unlocked_groups=3), EMBED)


@pytest.mark.parametrize("name", ["vit_large_patch14_clip_336", "eva02_enormous_patch14_clip_224"])
def test_lora_trains_only_adapters_and_merges_exactly(name: str) -> None:
    torch.manual_seed(0)
    plain = build_vision_tower(tiny_cfg(name), EMBED).eval()
    keys = set(plain.state_dict())
    torch.manual_seed(0)
    tower = build_vision_tower(tiny_cfg(name, lora_rank=4, lora_alpha=8.0), EMBED).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(tower(x), plain(x))  # B = 0 at init: wrapping changes nothing
    # qkv and proj of each of the 2 blocks; ViT-E's fused qkv is read as `.weight` by EVA's attention.
    wrapped = [n for n, m in tower.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 and all(n.endswith(("attn.qkv", "attn.proj")) for n in wrapped)
    assert trainable(tower) == {f"{w}.lora_{ab}" for w in wrapped for ab in "AB"} | {"head.weight", "head.bias"}

    tower.train()
    tower(x).square().sum().backward()
    assert all(tower.get_parameter(f"{w}.lora_A").grad is not None for w in wrapped)
    assert all(p.grad is None for n, p in tower.trunk.named_parameters() if "lora_" not in n)

    tower.eval()
    with torch.no_grad():
        for w in wrapped:
            tower.get_submodule(w).lora_B.normal_(0, 0.05)
        unmerged = tower(x)
        assert (unmerged - plain(x)).abs().max() > 1e-3  # the LoRA path is live, including EVA's F.linear path
        assert tower.merge_lora() == 4
        merged = tower(x)
    assert not any(isinstance(m, LoRALinear) for m in tower.modules())
    assert set(tower.state_dict()) == keys
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ param groups / LLRD


def test_llrd_monotone_by_depth_and_no_decay_for_norms_biases_tokens() -> None:
    cfg = ModelConfig(
        embed_dim=EMBED,
        vision=tiny_cfg("vit_so400m_patch14_siglip_224", timm_kwargs={**TINY, "depth": 4}),
        adapter=AdapterConfig(input_dim=32, num_blocks=1),
    )
    # vit_so400m has no class token; use the OpenAI layout for cls_token/norm_pre coverage too.
    for vision in (cfg.vision, tiny_cfg(timm_kwargs={**TINY, "depth": 4})):
        cfg.vision = vision
        model = build_clip_model(cfg)
        groups = build_param_groups(model, weight_decay=0.05, lr=1e-3, layer_decay=0.5)
        by_name: dict[str, tuple[float, float]] = {}
        ids = {id(p): n for n, p in model.named_parameters()}
        for g in groups:
            assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
            for p in g["params"]:
                assert ids[id(p)] not in by_name
                by_name[ids[id(p)]] = (g["lr_scale"], g["weight_decay"])
        assert set(by_name) == trainable(model)

        scale = {n: s for n, (s, _) in by_name.items()}
        stem = scale["vision.trunk.patch_embed.proj.weight"]
        blocks = [scale[f"vision.trunk.blocks.{i}.attn.qkv.weight"] for i in range(4)]
        assert stem < blocks[0] < blocks[1] < blocks[2] < blocks[3] < 1.0
        assert blocks == pytest.approx([0.5**4, 0.5**3, 0.5**2, 0.5**1])
        assert scale["vision.trunk.norm.weight"] == blocks[3]  # timm groups the final norm with the last block
        assert scale["vision.head.weight"] == 1.0
        assert all(scale[n] == 1.0 for n in by_name if n.startswith("adapter.") or n == "logit_scale")

        decay = {n: wd for n, (_, wd) in by_name.items()}
        no_decay = {n for n, wd in decay.items() if wd == 0.0}
        assert all(n in no_decay for n in decay if n.endswith(".bias") or ".norm" in n or "norm1" in n)
        assert {"logit_scale", "vision.trunk.pos_embed", "vision.trunk.blocks.0.norm1.weight"} <= no_decay
        assert "vision.trunk.cls_token" in no_decay or "vision.trunk.attn_pool.latent" in no_decay
        assert decay["vision.trunk.blocks.0.attn.qkv.weight"] == 0.05
        assert decay["vision.head.weight"] == 0.05 and decay["adapter.proj.weight"] == 0.05
        torch.optim.AdamW(groups, lr=1e-3)  # the dicts are valid optimizer groups


def test_one_group_per_lr_scale_and_decay() -> None:
    """ZeRO pays collectives per group and step: equal (lr_scale, weight_decay) share one group, at any layer decay."""
    model = build_clip_model(ModelConfig(embed_dim=EMBED, vision=tiny_cfg(timm_kwargs={**TINY, "depth": 4}),
                                         adapter=AdapterConfig(input_dim=32, num_blocks=1)))
    flat = build_param_groups(model, weight_decay=0.05, lr=1e-3, layer_decay=1.0)
    assert sorted(g["name"] for g in flat) == ["decay", "no_decay"]
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in flat for p in g["params"]) == sorted(trainable_ids)
    decayed = build_param_groups(model, weight_decay=0.05, lr=1e-3, layer_decay=0.5)
    keys = [(g["lr_scale"], g["weight_decay"]) for g in decayed]
    assert len(keys) == len(set(keys))
    assert {s for s, _ in keys} == {0.5**k for k in range(6)}  # stem, 4 blocks, head: one scale each


def test_param_groups_skip_frozen_and_keep_lora() -> None:
    tower = build_vision_tower(tiny_cfg(lora_rank=2), EMBED)
    groups = build_param_groups(tower, weight_decay=0.1, lr=1.0, layer_decay=0.8)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in tower.parameters() if p.requires_grad}


# ------------------------------------------------------------------------------- grad checkpointing / patch drop


@pytest.mark.parametrize("name", ["vit_large_patch14_clip_336", "eva02_large_patch14_clip_336"])
def test_grad_checkpointing_gives_identical_grads(name: str) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tower = build_vision_tower(tiny_cfg(name, grad_checkpointing=ckpt), EMBED).train()
        assert getattr(tower.trunk, "grad_checkpointing", False) == ckpt
        tower(images()).square().sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=0, msg=n)


def test_patch_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    ref = build_vision_tower(tiny_cfg(), EMBED).eval()
    torch.manual_seed(0)
    tower = build_vision_tower(tiny_cfg(patch_dropout=0.5), EMBED)
    assert type(tower.trunk.patch_drop).__name__ == "PatchDropout"
    x = images()
    with torch.no_grad():
        assert torch.equal(tower.eval()(x), ref(x))
        assert not torch.allclose(tower.train()(x), ref.train()(x))
