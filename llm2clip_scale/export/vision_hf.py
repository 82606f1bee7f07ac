"""The vision tower as a stock transformers model, where transformers has its architecture (CLIP or SigLIP ViTs).

transformers' ``CLIPVisionModelWithProjection`` projects without a bias and ``SiglipVisionModel`` does not project
at all, so the tower is written as two parts: the timm TRUNK as a ``CLIPVisionModel`` / ``SiglipVisionModel`` whose
``pooler_output`` equals timm's pooled features (``forward_head(..., pre_logits=True)``), and the trained head as a
plain Linear in ``head.safetensors``. ``head(hf(pixel_values).pooler_output)`` is then the image embedding that
``timm_model(images)`` gives.

Only what maps exactly is converted; the structure is read from the timm module itself (not from its name), and
everything transformers cannot express (EVA/RoPE/SwiGLU trunks, register tokens, layer scale, qk-norm, a
patch-embed bias where CLIP has none, other pools or norm placements, ...) is refused with a reason instead.
Absent biases become zeros and a class token without a position embedding gets a zero one: both add exactly 0.
Dropout, drop-path and patch dropout are inference no-ops and are not looked at (the exported config has no
dropout either).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

HFVision = tuple[str, dict, dict[str, Tensor], dict[str, Tensor]]


class _Unsupported(Exception):
    """The reason a timm model has no exact transformers counterpart."""


def _activation(act: nn.Module) -> str:
    """transformers' ``hidden_act`` name computing exactly what timm's activation computes."""
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    names = {GELU: "gelu", GELUTanh: "gelu_pytorch_tanh", QuickGELU: "quick_gelu"}  # x * sigmoid(1.702 x) in both
    if type(act) not in names:
        raise _Unsupported(f"activation {type(act).__name__} has no transformers hidden_act computing the same")
    return names[type(act)]


def _layer_norm(norm: nn.Module, dim: int, where: str, eps: set[float]) -> nn.LayerNorm:
    from timm.layers import LayerNorm

    # Subclasses (LayerNormFp32, RmsNorm, ...) compute differently from the nn.LayerNorm transformers builds.
    if type(norm) not in (nn.LayerNorm, LayerNorm):
        raise _Unsupported(f"{where} is {type(norm).__name__}, not a LayerNorm")
    if norm.normalized_shape != (dim,) or norm.weight is None or norm.bias is None:
        raise _Unsupported(f"{where} is not an affine LayerNorm over {dim} features with bias")
    eps.add(float(norm.eps))
    return norm


def _bias(linear: nn.Linear | nn.Conv2d) -> Tensor:
    """The bias, or exact zeros where timm has none and transformers always has one."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.weight.shape[0], dtype=linear.weight.dtype, device=linear.weight.device)


def _linear(state: dict[str, Tensor], prefix: str, linear: nn.Module, shape: tuple[int, int], where: str) -> None:
    if type(linear) is not nn.Linear or tuple(linear.weight.shape) != shape:
        raise _Unsupported(f"{where} is not a Linear {shape[1]} -> {shape[0]}")
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = linear.weight, _bias(linear)


def _put_norm(state: dict[str, Tensor], prefix: str, norm: nn.LayerNorm) -> None:
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = norm.weight, norm.bias


def _blocks(model: nn.Module, state: dict[str, Tensor], eps: set[float]) -> tuple[int, int, str]:
    """The transformer blocks into ``encoder.layers.*``; returns (num_heads, intermediate_size, hidden_act)."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    dim = model.embed_dim
    seen: set[tuple[int, int, str]] = set()
    for index, block in enumerate(model.blocks):
        where = f"blocks.{index}"
        # Block subclasses / siblings (ResPostBlock, ParallelScalingBlock, ...) order their parts differently.
        if type(block) is not Block:
            raise _Unsupported(f"{where} is {type(block).__name__}, not timm's pre-norm Block")
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            raise _Unsupported(f"{where} has layer scale (init_values), which transformers' CLIP/SigLIP lack")
        attn, mlp = block.attn, block.mlp
        # getattr: older timm releases (>= 1.0.20 is allowed) have no output gate / scale norm at all
        gated = getattr(attn, "gate", None) is not None
        if type(attn) is not Attention or gated:
            raise _Unsupported(f"{where}.attn is {type(attn).__name__}{' (gated)' if gated else ''}, "
                               "not timm's plain Attention")
        norms = (attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity()))
        if not all(isinstance(m, nn.Identity) for m in norms):
            raise _Unsupported(f"{where}.attn normalises q/k or its output (qk_norm / scale_norm)")
        if attn.head_dim * attn.num_heads != dim:
            raise _Unsupported(f"{where}.attn has {attn.num_heads} heads of {attn.head_dim}, not splitting {dim}")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            raise _Unsupported(f"{where}.mlp is {type(mlp).__name__}"
                               f"{'' if isinstance(getattr(mlp, 'norm', None), nn.Identity) else ' with a norm'}, "
                               "not the fc1-act-fc2 MLP of transformers")
        hidden = mlp.fc1.out_features if isinstance(mlp.fc1, nn.Linear) else -1
        seen.add((attn.num_heads, hidden, _activation(mlp.act)))

        prefix = f"encoder.layers.{index}"
        _put_norm(state, f"{prefix}.layer_norm1", _layer_norm(block.norm1, dim, f"{where}.norm1", eps))
        _put_norm(state, f"{prefix}.layer_norm2", _layer_norm(block.norm2, dim, f"{where}.norm2", eps))
        if type(attn.qkv) is not nn.Linear or tuple(attn.qkv.weight.shape) != (3 * dim, dim):
            raise _Unsupported(f"{where}.attn.qkv is not a Linear {dim} -> {3 * dim}")
        # timm's fused qkv rows are [q; k; v] (reshape(B, N, 3, heads, head_dim)), heads contiguous within each.
        for name, weight, bias in zip("qkv", attn.qkv.weight.chunk(3), _bias(attn.qkv).chunk(3), strict=True):
            state[f"{prefix}.self_attn.{name}_proj.weight"] = weight
            state[f"{prefix}.self_attn.{name}_proj.bias"] = bias
        _linear(state, f"{prefix}.self_attn.out_proj", attn.proj, (dim, dim), f"{where}.attn.proj")
        _linear(state, f"{prefix}.mlp.fc1", mlp.fc1, (hidden, dim), f"{where}.mlp.fc1")
        _linear(state, f"{prefix}.mlp.fc2", mlp.fc2, (dim, hidden), f"{where}.mlp.fc2")
    if len(seen) != 1:
        raise _Unsupported(f"blocks differ in (heads, mlp width, act) {sorted(seen)}; transformers has one of each")
    return seen.pop()


def _patch_embed(model: nn.Module) -> tuple[int, int, int]:
    """(image size, patch size, channels) of a plain, fixed-size, square conv patch embedding."""
    from timm.layers import PatchEmbed

    embed = model.patch_embed
    if model.dynamic_img_size or embed.dynamic_img_pad or not embed.strict_img_size:
        # Other input sizes would resample position embeddings, which timm and transformers do differently.
        raise _Unsupported("dynamic image size / padding; transformers' CLIP/SigLIP take one fixed image size")
    if type(embed) is not PatchEmbed or not isinstance(embed.norm, nn.Identity) or not embed.flatten:
        raise _Unsupported(f"patch_embed is {type(embed).__name__} (normed or unflattened), not a plain conv")
    conv = embed.proj
    (height, width), (ph, pw) = embed.img_size, embed.patch_size
    if height != width or ph != pw:
        raise _Unsupported(f"image {height}x{width} / patch {ph}x{pw} is not square")
    if (type(conv) is not nn.Conv2d or conv.kernel_size != (ph, pw) or conv.stride != (ph, pw)
            or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1):
        raise _Unsupported("patch_embed.proj is not a non-overlapping patch convolution")
    return height, ph, conv.in_channels


def _position_embedding(model: nn.Module, with_class: bool) -> Tensor:
    """Rows for transformers' ``position_embedding`` ([class,] patches)."""
    dim, patches = model.embed_dim, model.patch_embed.num_patches
    prefix = 1 if with_class else 0
    if model.pos_embed is None:  # pos_embed='none': zeros add nothing
        return torch.zeros(patches + prefix, dim, dtype=model.patch_embed.proj.weight.dtype)
    pos = model.pos_embed.reshape(-1, dim)
    if model.no_embed_class and prefix:  # timm adds none to the class token; transformers adds row 0, so a zero row
        pos = torch.cat([pos.new_zeros(1, dim), pos])
    if pos.shape[0] != patches + prefix:
        raise _Unsupported(f"pos_embed has {pos.shape[0]} rows, expected {patches + prefix}")
    return pos


def _clip(model: nn.Module, state: dict[str, Tensor], eps: set[float]) -> None:
    """CLIPVisionModel: class token + positions, pre_layrnorm, blocks, post_layernorm on the class token."""
    dim = model.embed_dim
    if isinstance(model.norm_pre, nn.Identity):
        raise _Unsupported("no norm_pre (pre_norm=False), but transformers' CLIP always applies pre_layrnorm")
    if model.patch_embed.proj.bias is not None:
        raise _Unsupported("patch_embed has a bias, which transformers' CLIP patch_embedding lacks")
    # timm normalises either every token before pooling (norm) or the pooled token (fc_norm): LayerNorm is per
    # token, so both equal transformers' post_layernorm of the class token. Neither or both cannot be expressed.
    final = [(name, norm) for name, norm in (("norm", model.norm), ("fc_norm", model.fc_norm))
             if not isinstance(norm, nn.Identity)]
    if len(final) != 1:
        raise _Unsupported(f"{' and '.join(n for n, _ in final) or 'no final norm'}; transformers' CLIP applies "
                           "exactly one LayerNorm to the class token")
    state["embeddings.class_embedding"] = model.cls_token.reshape(dim)
    state["embeddings.patch_embedding.weight"] = model.patch_embed.proj.weight
    state["embeddings.position_embedding.weight"] = _position_embedding(model, with_class=True)
    _put_norm(state, "pre_layrnorm", _layer_norm(model.norm_pre, dim, "norm_pre", eps))
    _put_norm(state, "post_layernorm", _layer_norm(final[0][1], dim, final[0][0], eps))


def _siglip(model: nn.Module, state: dict[str, Tensor], eps: set[float], heads: int, hidden: int, act: str) -> None:
    """SiglipVisionModel: patches + positions, blocks, post_layernorm on every token, MAP head."""
    from timm.layers import AttentionPoolLatent, Mlp

    dim = model.embed_dim
    if not isinstance(model.norm_pre, nn.Identity):
        raise _Unsupported("norm_pre (pre_norm=True), which transformers' SigLIP lacks")
    # transformers' post_layernorm runs on all tokens before the head, as timm's ``norm``; a norm after the pool
    # (fc_norm) or none at all has no place there.
    if not isinstance(model.fc_norm, nn.Identity) or isinstance(model.norm, nn.Identity):
        raise _Unsupported("the final norm is not applied before the attention pool (fc_norm, or final_norm=False)")
    pool = model.attn_pool
    if type(pool) is not AttentionPoolLatent:
        raise _Unsupported(f"attn_pool is {type(pool).__name__}, not a MAP head")
    if (pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token" or pool.mlp is None
            or not isinstance(pool.q_norm, nn.Identity) or not isinstance(pool.k_norm, nn.Identity)):
        raise _Unsupported("attn_pool is not a single-latent MAP head (latent_len, pos_embed, qk_norm, pool, no mlp)")
    if pool.num_heads != heads or pool.latent_dim != dim or type(pool.mlp) is not Mlp \
            or not isinstance(pool.mlp.norm, nn.Identity) or _activation(pool.mlp.act) != act:
        raise _Unsupported("attn_pool's heads / width / MLP / act differ from the trunk's, which transformers shares")

    state["embeddings.patch_embedding.weight"] = model.patch_embed.proj.weight
    state["embeddings.patch_embedding.bias"] = _bias(model.patch_embed.proj)
    state["embeddings.position_embedding.weight"] = _position_embedding(model, with_class=False)
    _put_norm(state, "post_layernorm", _layer_norm(model.norm, dim, "norm", eps))
    state["head.probe"] = pool.latent.reshape(1, 1, dim)
    # torch MultiheadAttention packs [q; k; v] into in_proj; timm's kv rows are [k; v] (reshape(B, N, 2, heads, ..)).
    _linear(state, "q", pool.q, (dim, dim), "attn_pool.q")
    _linear(state, "kv", pool.kv, (2 * dim, dim), "attn_pool.kv")
    state["head.attention.in_proj_weight"] = torch.cat([state.pop("q.weight"), state.pop("kv.weight")])
    state["head.attention.in_proj_bias"] = torch.cat([state.pop("q.bias"), state.pop("kv.bias")])
    _linear(state, "head.attention.out_proj", pool.proj, (dim, dim), "attn_pool.proj")
    _put_norm(state, "head.layernorm", _layer_norm(pool.norm, dim, "attn_pool.norm", eps))
    _linear(state, "head.mlp.fc1", pool.mlp.fc1, (hidden, dim), "attn_pool.mlp.fc1")
    _linear(state, "head.mlp.fc2", pool.mlp.fc2, (dim, hidden), "attn_pool.mlp.fc2")


def transformers_vision(model: nn.Module) -> HFVision | str:
    """(architecture, config dict, transformers state dict, head {"weight", "bias"}) of a timm classifier from
    ``build_timm_classifier``, or the reason it has no exact transformers counterpart."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    try:
        # Exact type: subclasses (distilled DeiT, ...) and other families (Eva, NaFlexVit, ...) forward differently.
        if type(model) is not VisionTransformer:
            raise _Unsupported(f"{type(model).__name__} is not timm's VisionTransformer")
        if type(model.head) is not nn.Linear:
            raise _Unsupported(f"the classifier is {type(model.head).__name__}, not one Linear")
        if model.reg_token is not None:
            raise _Unsupported(f"{model.num_reg_tokens} register tokens, which transformers' CLIP/SigLIP lack")
        image_size, patch_size, channels = _patch_embed(model)
        state: dict[str, Tensor] = {}
        eps: set[float] = set()
        heads, hidden, act = _blocks(model, state, eps)
        if model.cls_token is not None and model.global_pool == "token" and model.attn_pool is None:
            architecture, config_class = "CLIPVisionModel", CLIPVisionConfig
            _clip(model, state, eps)
        elif model.cls_token is None and model.global_pool == "map":
            architecture, config_class = "SiglipVisionModel", SiglipVisionConfig
            _siglip(model, state, eps, heads, hidden, act)
        else:
            raise _Unsupported(f"global_pool={model.global_pool!r} with class_token={model.cls_token is not None}: "
                               "transformers' CLIP pools the class token, SigLIP a MAP head over patch tokens")
        if len(eps) != 1:
            raise _Unsupported(f"LayerNorm eps values {sorted(eps)}; transformers' config has one layer_norm_eps")
    except _Unsupported as reason:
        return f"not exportable as a transformers vision model: {reason}"

    config = config_class(hidden_size=model.embed_dim, intermediate_size=hidden, num_hidden_layers=len(model.blocks),
                          num_attention_heads=heads, num_channels=channels, image_size=image_size,
                          patch_size=patch_size, hidden_act=act, layer_norm_eps=eps.pop(),
                          architectures=[architecture])
    # Own contiguous copies: q/k/v are views of one qkv tensor, which safetensors would refuse (or dedupe).
    state = {name: value.detach().clone(memory_format=torch.contiguous_format) for name, value in state.items()}
    head = {"weight": model.head.weight.detach().clone(), "bias": _bias(model.head).detach().clone()}
    return architecture, config.to_dict(), state, head


def load_transformers_vision(architecture: str, config: dict, state: dict[str, Tensor]) -> nn.Module:
    """The transformers model holding ``state`` (keys and shapes checked strictly), without a random init."""
    import transformers

    config_class = {"CLIPVisionModel": transformers.CLIPVisionConfig,
                    "SiglipVisionModel": transformers.SiglipVisionConfig}[architecture]
    model_class = getattr(transformers, architecture)
    with torch.device("meta"):  # every parameter is assigned next; initialising ViT-g/E on CPU would take minutes
        model = model_class(config_class.from_dict(config))
    model.load_state_dict(state, strict=True, assign=True)
    positions = model.embeddings.position_embedding.num_embeddings
    model.embeddings.position_ids = torch.arange(positions).expand((1, -1))  # non-persistent buffer, not in state
    left = [name for name, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta]
    if left:
        raise RuntimeError(f"{architecture}: {left[:3]} were not set by the conversion")
    return model.eval()


def write_transformers_vision(model: nn.Module, out_dir: Path, dtype: torch.dtype,
                              on_tensor: Callable[[str, Tensor], None] | None = None) -> dict:
    """Write ``out_dir/{config.json, model.safetensors, head.safetensors}``; the record for export.json, or
    {"skipped": reason} having written nothing.

    ``on_tensor(name, tensor)`` sees every written tensor as saved (for the converter's fingerprints): the trunk's
    under its transformers ``state_dict()`` name, the head's as ``head.safetensors:weight`` / ``:bias`` (SigLIP's
    trunk has ``head.*`` keys of its own).
    """
    from safetensors.torch import save_file

    converted = transformers_vision(model)
    if isinstance(converted, str):
        return {"skipped": converted}
    architecture, config, state, head = converted
    hf_model = load_transformers_vision(architecture, config, {k: v.to(dtype) for k, v in state.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    # Not save_pretrained: under an initialised torch.distributed it writes only on global rank 0, and the
    # converter may run on any rank (the export tests run one per rank).
    hf_model.config.save_pretrained(out_dir)
    save_file({name: value.contiguous() for name, value in hf_model.state_dict().items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    head = {name: value.to(dtype).contiguous() for name, value in head.items()}
    if on_tensor is not None:
        for name, value in hf_model.state_dict().items():
            on_tensor(name, value)
        for name, value in head.items():
            on_tensor(f"head.safetensors:{name}", value)
    save_file(head, str(out_dir / "head.safetensors"),
              metadata={"format": "pt", "usage": "image_embeds = pooler_output @ weight.T + bias"})
    written = json.loads((out_dir / "config.json").read_text())
    return {"architecture": architecture, "image_size": written["image_size"],
            "embed_dim": int(head["weight"].shape[0]), "feature_dim": int(head["weight"].shape[1]),
            "files": sorted(path.name for path in out_dir.iterdir())}
