"""The vision tower as a stock transformers CLIP / SigLIP vision model plus the head Linear (export/vision_hf.py).

Tiny timm towers with every parameter randomised (norms and biases too, so no missed or swapped tensor can hide
behind an init value) are converted, reloaded with stock ``from_pretrained`` and compared in fp32:
``head(hf(pixel_values).pooler_output)`` against ``timm_model(images)``, as max |diff| / max |timm|.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
import transformers
from torch import nn

from llm2clip_scale.config.schema import VisionConfig
from llm2clip_scale.export.vision import build_timm_classifier
from llm2clip_scale.export.vision_hf import load_transformers_vision, transformers_vision, write_transformers_vision

TOLERANCE = 1e-5  # fp32: the same math, only kernels / summation order may differ
WRONG_AT_LEAST = 1e-2  # a deliberately wrong conversion must miss by >= 1000x the tolerance
SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
EMBED_DIM = 16

SUPPORTED = {
    "clip": ("vit_base_patch16_clip_224", {}, "CLIPVisionModel", "gelu"),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {}, "CLIPVisionModel", "quick_gelu"),
    # class token without a position embedding, norm after the pool instead of before, no q/k/v bias
    "clip_fc_norm": ("vit_base_patch16_clip_224", {"no_embed_class": True, "fc_norm": True, "qkv_bias": False},
                     "CLIPVisionModel", "gelu"),
    "siglip": ("vit_base_patch16_siglip_224", {}, "SiglipVisionModel", "gelu"),
    # so400m's odd MLP width, tanh GELU, one input channel
    "siglip_tanh": ("vit_base_patch16_siglip_224", {"act_layer": "gelu_tanh", "mlp_ratio": 3.7362, "in_chans": 1},
                    "SiglipVisionModel", "gelu_pytorch_tanh"),
}


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    norm_params = {id(p) for m in norms for p in m.parameters()}
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))
        for name, param in model.named_parameters():
            if id(param) not in norm_params:
                fan_in = param[0].numel() if param.ndim >= 2 and name.endswith("weight") else 0
                param.copy_(torch.randn(param.shape, generator=generator) * (fan_in ** -0.5 if fan_in else 0.3))
    return model.eval()


def tiny(name: str, **kwargs) -> nn.Module:
    return randomise(timm.create_model(name, pretrained=False, num_classes=EMBED_DIM, **{**SMALL, **kwargs}))


def rel_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found.double() - expected.double()).abs().max() / expected.double().abs().max())


def images(model: nn.Module, n: int = 3) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(n, model.patch_embed.proj.in_channels, *size, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def hf_embeddings(hf_model: nn.Module, head: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(hf_model(pixel_values=pixels).pooler_output, head["weight"], head["bias"])


@pytest.mark.parametrize("case", sorted(SUPPORTED))
def test_export_matches_timm(case: str, tmp_path) -> None:
    name, kwargs, architecture, act = SUPPORTED[case]
    model = tiny(name, **kwargs)
    converted = transformers_vision(model)
    assert not isinstance(converted, str), converted
    arch, config, state, head = converted
    assert arch == architecture and config["architectures"] == [architecture] and config["hidden_act"] == act

    # The state uses transformers' own names and shapes, all of them.
    config_class = getattr(transformers, architecture.replace("Model", "Config"))
    fresh = getattr(transformers, architecture)(config_class.from_dict(config)).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in fresh.items()}
    assert torch.equal(head["weight"], model.head.weight) and torch.equal(head["bias"], model.head.bias)

    out = tmp_path / "vision_hf"
    seen: dict[str, torch.Tensor] = {}
    record = write_transformers_vision(model, out, torch.float32, on_tensor=seen.__setitem__)
    assert record["architecture"] == architecture and record["embed_dim"] == EMBED_DIM
    assert set(seen) == set(state) | {"head.safetensors:weight", "head.safetensors:bias"}
    assert {"config.json", "model.safetensors", "head.safetensors"} <= set(record["files"])
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    # Stock transformers, no llm2clip_scale code: from_pretrained + the head file.
    hf_model, info = getattr(transformers, architecture).from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    saved_head = safetensors.torch.load_file(out / "head.safetensors")
    assert all(torch.equal(value, seen[name]) for name, value in hf_model.state_dict().items())
    assert all(torch.equal(value, seen[f"head.safetensors:{name}"]) for name, value in saved_head.items())
    pixels = images(model)
    with torch.no_grad():
        expected = model(pixels)
        pooled = model.forward_head(model.forward_features(pixels), pre_logits=True)
    found = hf_embeddings(hf_model.eval(), saved_head, pixels)
    error = rel_error(found, expected)
    pooled_error = rel_error(hf_model(pixel_values=pixels).pooler_output.detach(), pooled)
    print(f"{case}: image embedding rel error {error:.3g}, pooled feature rel error {pooled_error:.3g}")
    assert error <= TOLERANCE and pooled_error <= TOLERANCE

    # The comparison can fail: q and k of the first layer swapped (and, for SigLIP, k and v of the MAP head).
    wrongs = {"q<->k layer 0": {"encoder.layers.0.self_attn.q_proj.weight": state[
        "encoder.layers.0.self_attn.k_proj.weight"], "encoder.layers.0.self_attn.k_proj.weight": state[
        "encoder.layers.0.self_attn.q_proj.weight"]}}
    if architecture == "SiglipVisionModel":
        q, k, v = state["head.attention.in_proj_weight"].chunk(3)
        wrongs["k<->v MAP head"] = {"head.attention.in_proj_weight": torch.cat([q, v, k])}
    for label, change in wrongs.items():
        wrong_model = load_transformers_vision(architecture, config, {**state, **change})
        wrong_error = rel_error(hf_embeddings(wrong_model, head, pixels), expected)
        print(f"{case}: {label}: rel error {wrong_error:.3g}")
        assert wrong_error > WRONG_AT_LEAST, label


def test_bfloat16_export(tmp_path) -> None:
    model = tiny("vit_base_patch16_siglip_224")
    out = tmp_path / "vision_hf"
    write_transformers_vision(model, out, torch.bfloat16)
    assert {v.dtype for v in safetensors.torch.load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    head = safetensors.torch.load_file(out / "head.safetensors")
    assert {v.dtype for v in head.values()} == {torch.bfloat16}
    hf_model = transformers.SiglipVisionModel.from_pretrained(out, dtype=torch.float32).eval()
    pixels = images(model)
    with torch.no_grad():
        expected = model(pixels)
    error = rel_error(hf_embeddings(hf_model, {k: v.float() for k, v in head.items()}, pixels), expected)
    print(f"bf16 SigLIP export: rel error {error:.3g}")
    assert error <= 3e-2  # convert.py's bf16 tolerance


def test_tower_from_build_timm_classifier(tmp_path) -> None:
    """The model the converter actually passes: built on the meta device and filled from a tower state."""
    vision = VisionConfig(name="vit_base_patch16_clip_quickgelu_224", image_size=32,
                          timm_kwargs={k: v for k, v in SMALL.items() if k != "img_size"})
    trunk = randomise(timm.create_model(vision.name, pretrained=False, num_classes=0, **SMALL))
    head = randomise(nn.Linear(SMALL["embed_dim"], EMBED_DIM), seed=3)
    tower_state = {**{f"trunk.{k}": v for k, v in trunk.state_dict().items()},
                   **{f"head.{k}": v for k, v in head.state_dict().items()}}
    model = build_timm_classifier(vision, EMBED_DIM, tower_state)
    record = write_transformers_vision(model, tmp_path / "vision_hf", torch.float32)
    assert record["architecture"] == "CLIPVisionModel"
    hf_model = transformers.CLIPVisionModel.from_pretrained(tmp_path / "vision_hf").eval()
    pixels = images(model)
    with torch.no_grad():
        expected = head(trunk(pixels))
    saved_head = safetensors.torch.load_file(tmp_path / "vision_hf" / "head.safetensors")
    assert rel_error(hf_embeddings(hf_model, saved_head, pixels), expected) <= TOLERANCE


def _with_patch_bias(model: nn.Module) -> nn.Module:
    model.patch_embed.proj.bias = nn.Parameter(torch.randn(model.embed_dim))  # CLIP's patch conv has none
    return model


UNSUPPORTED = {
    "eva02": (lambda: tiny("eva02_tiny_patch14_224", depth=1), "Eva"),
    "register tokens": (lambda: tiny("vit_base_patch16_clip_224", reg_tokens=4), "register"),
    "layer scale": (lambda: tiny("vit_base_patch16_clip_224", init_values=1e-5), "layer scale"),
    "qk norm": (lambda: tiny("vit_base_patch16_clip_224", qk_norm=True), "qk_norm"),
    "plain ViT (no pre-norm)": (lambda: tiny("vit_tiny_patch16_224"), "norm_pre"),
    "patch bias": (lambda: _with_patch_bias(tiny("vit_base_patch16_clip_224")), "bias"),
    "avg pool": (lambda: tiny("vit_base_patch16_clip_224", global_pool="avg"), "global_pool"),
    "dynamic size": (lambda: tiny("vit_base_patch16_clip_224", dynamic_img_size=True), "dynamic"),
    "siglip fc_norm": (lambda: tiny("vit_base_patch16_siglip_224", fc_norm=True), "fc_norm"),
    "silu": (lambda: tiny("vit_base_patch16_clip_224", act_layer="silu"), "activation"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_is_refused(case: str, tmp_path) -> None:
    build, keyword = UNSUPPORTED[case]
    model = build()
    reason = transformers_vision(model)
    assert isinstance(reason, str) and keyword in reason, reason
    out = tmp_path / "vision_hf"
    assert write_transformers_vision(model, out, torch.float32) == {"skipped": reason}
    assert not out.exists()
