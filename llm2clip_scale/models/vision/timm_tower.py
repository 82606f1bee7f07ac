"""Vision tower: a timm trunk (any timm model name) plus a fresh linear head to the shared embedding.

LLM2CLIP keeps the pretrained trunk — including SigLIP's attention-pooling head — and re-initialises only the final
projection, so the trunk is built with ``num_classes=0`` (pooled features out) and the projection lives in
``VisionTower.head``. ``layer_decay`` is consumed by :mod:`.param_groups`, not here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator

import timm
import torch
import torch.nn.functional as F
from timm.layers import set_fused_attn, use_fused_attn
from timm.models import group_parameters
from timm.models._manipulate import group_with_matcher, reinit_non_persistent_buffers
from timm.optim._param_groups import auto_group_layers
from torch import nn

from llm2clip_scale.config.schema import VisionConfig
from llm2clip_scale.kernels import resolve
from llm2clip_scale.models.vision.pretrained import LoadReport, load_pretrained_trunk

logger = logging.getLogger(__name__)

# Attention input/output projections of the trunk's transformer blocks: timm ViT (qkv, proj) and EVA (fused qkv or
# q/k/v_proj, proj). SigLIP's attention-pool head is deliberately not a target: under LoRA it stays frozen.
DEFAULT_LORA_TARGETS = r"(^|\.)blocks\.\d+\.attn\.(qkv|q_proj|k_proj|v_proj|proj)$"


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with B zero-initialised, so wrapping leaves the output unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / peft, so A x has unit-ish scale

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # EVA's fused-qkv attention calls F.linear(x, self.qkv.weight, q/k/v bias) directly instead of the module,
        # so the effective (differentiable) weight must be what `.weight` returns or LoRA would be bypassed.
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Low-rank path on activations: cheaper than materialising the full delta weight every step.
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear with the LoRA delta folded in (same key names as before wrapping)."""
        b = self.base
        out = nn.Linear(
            b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device, dtype=b.weight.dtype
        )
        with torch.no_grad():
            out.weight.copy_(b.weight + self.delta_weight())
            if b.bias is not None:
                out.bias.copy_(b.bias)
        out.weight.requires_grad_(b.weight.requires_grad)
        if out.bias is not None and b.bias is not None:
            out.bias.requires_grad_(b.bias.requires_grad)
        return out


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_lora(module: nn.Module, rank: int, alpha: float, targets: str = DEFAULT_LORA_TARGETS) -> list[str]:
    """Wrap every nn.Linear whose qualified name matches ``targets``; returns the wrapped names."""
    pattern = re.compile(targets)
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    for n in names:
        _set_submodule(module, n, LoRALinear(module.get_submodule(n), rank, alpha))
    if not names:
        raise ValueError(f"LoRA pattern {targets!r} matched no nn.Linear in {type(module).__name__}")
    return names


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRALinear back into a plain nn.Linear in place; returns how many were merged."""
    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_submodule(module, n, module.get_submodule(n).merged())
    return len(names)


def trunk_layer_map(trunk: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id (0 = stem, then blocks with the final norm in the last one, then un-matched
    modules such as SigLIP's attention pool) from timm's own ``group_matcher``."""
    if hasattr(trunk, "group_matcher"):
        return group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
    return auto_group_layers(trunk)


def tower_layer_map(tower: VisionTower) -> dict[str, int]:
    """Layer ids for every tower parameter, as timm would assign them if the fresh head sat inside the trunk.

    Running the trunk's matcher over ``head.*`` names leaves them un-matched, which timm sends to the last group —
    together with an attention pool if there is one — exactly as for a stock timm model with its classifier.
    """
    own = [(n.removeprefix("trunk."), n) for n, _ in tower.named_parameters()]
    if hasattr(tower.trunk, "group_matcher"):
        short = group_with_matcher(((s, None) for s, _ in own), tower.trunk.group_matcher(coarse=False), reverse=True)
        return {full: short[s] for s, full in own}
    trunk_ids = auto_group_layers(tower.trunk)
    top = max(trunk_ids.values(), default=-1) + 1
    return {full: trunk_ids.get(s, top) if full.startswith("trunk.") else top for s, full in own}


class VisionTower(nn.Module):
    """timm trunk (pooled features, original head removed) + fresh Linear(feature_dim -> embed_dim)."""

    def __init__(self, trunk: nn.Module, embed_dim: int, head_device: torch.device | str | None = None,
                 head_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        # head_hidden_size differs from num_features for trunks with a pre-logits layer; it is what pooling outputs.
        self.feature_dim = int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)
        self.embed_dim = embed_dim
        meta = head_device is not None and torch.device(head_device).type == "meta"
        self.head = nn.Linear(self.feature_dim, embed_dim, device="meta" if meta else "cpu")
        if not meta:
            # CLIP-style projection init (std = width^-0.5): the embedding starts with unit-scale norm.
            nn.init.normal_(self.head.weight, std=self.feature_dim**-0.5)
            nn.init.zeros_(self.head.bias)
        self.head.to(device=head_device, dtype=head_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unpooled token features of the trunk (b, tokens, width)."""
        return self.trunk.forward_features(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def load_pretrained(self, path: str, strict: bool = True) -> LoadReport:
        report = load_pretrained_trunk(self.trunk, path, strict=strict)
        report.expected_missing = [f"head.{n}" for n, _ in self.head.named_parameters()]
        return report

    def lock(self, unlocked_blocks: int = 0, keep_lora_trainable: bool = True) -> None:
        """Freeze the trunk except its last ``unlocked_blocks`` blocks and everything after them (final norm,
        attention pool); the head always trains. LoRA factors stay trainable — freezing them would make LoRA a no-op.
        """
        layer_map = trunk_layer_map(self.trunk)
        threshold = math.inf
        if unlocked_blocks > 0:
            blocks = getattr(self.trunk, "blocks", None)
            if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
                if unlocked_blocks > len(blocks):
                    raise ValueError(f"lock_unlocked_groups={unlocked_blocks} > {len(blocks)} trunk blocks")
                first = len(blocks) - unlocked_blocks
                threshold = min(v for k, v in layer_map.items() if k.startswith(f"blocks.{first}."))
            else:  # non-ViT trunk: open_clip semantics, the last N timm parameter groups
                threshold = max(layer_map.values()) - unlocked_blocks + 1
        for name, p in self.trunk.named_parameters():
            is_lora = ".lora_A" in name or ".lora_B" in name
            layer = layer_map.get(name, max(layer_map.values()))
            p.requires_grad_((is_lora and keep_lora_trainable) or layer >= threshold)
        self.head.requires_grad_(True)

    def merge_lora(self) -> int:
        return merge_lora(self.trunk)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's matcher protocol (a callable form), so ``timm.optim.param_groups_layer_decay`` works on the tower."""
        del coarse  # fine-grained only: one group per block is what layer decay needs
        ids = tower_layer_map(self)
        return ids.__getitem__


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Works on meta-device modules (numel needs no storage)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _timm_kwargs(cfg: VisionConfig) -> dict:
    kwargs = {"img_size": cfg.image_size, **cfg.timm_kwargs}
    kwargs.pop("num_classes", None)  # the projection is VisionTower.head, never timm's classifier
    patch_dropout = cfg.patch_dropout
    if patch_dropout > 0:
        kwargs["patch_drop_rate"] = patch_dropout
    return kwargs


@contextlib.contextmanager
def _timm_fused_attention(enable: bool) -> Iterator[None]:
    """timm's fused-attention flag for one build. Each timm attention module reads the flag once, in its constructor
    (``self.fused_attn = use_fused_attn()``), so setting it around ``create_model`` decides the whole trunk; it is
    restored after, so nothing else in the process (open_clip references, tools) is affected. Turning it on keeps
    a setting timm already has on, including ``TIMM_FUSED_ATTN=2`` (its experimental modules too)."""
    previous = 2 if use_fused_attn(experimental=True) else 1 if use_fused_attn() else 0
    if not enable:
        set_fused_attn(False)
    elif not previous:
        set_fused_attn(True)
    try:
        yield
    finally:
        set_fused_attn(previous > 0, experimental=previous == 2)


def attention_modules(module: nn.Module) -> dict[str, bool]:
    """Qualified name -> ``fused_attn`` of every timm attention module (the attribute timm's forward branches on)."""
    return {n: m.fused_attn for n, m in module.named_modules() if isinstance(getattr(m, "fused_attn", None), bool)}


def _create_trunk(name: str, kwargs: dict) -> nn.Module:
    # The kernel registry's attention choice (``llm2clip-scale env``): "sdpa" makes timm call
    # F.scaled_dot_product_attention, the reference ("timm.explicit") its unfused softmax(q k^T) v.
    choice = resolve("attention")
    try:
        with _timm_fused_attention(choice.name == "sdpa"):
            trunk = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        modules = attention_modules(trunk)
        logger.info("vision tower %s: %d of %d timm attention modules call F.scaled_dot_product_attention (kernel "
                    "registry: %s, %s)", name, sum(modules.values()), len(modules), choice.name, choice.reason)
        return trunk
    except TypeError as e:
        if "patch_drop_rate" in kwargs and "patch_drop_rate" in str(e):
            raise ValueError(f"timm model {name!r} does not support patch_dropout") from e
        raise


def _buffers_reinitialisable(module: nn.Module) -> bool:
    """True when every non-persistent buffer (RoPE tables, fixed biases) can be recomputed after ``to_empty``;
    such buffers are not in checkpoints, so a module that cannot recompute them rules out the meta fast path."""
    return all(not m._non_persistent_buffers_set or hasattr(m, "init_non_persistent_buffers") for m in module.modules())


# Buffers that are concatenated with parameters inside a layer, so they must share the parameters' dtype: timm's EVA
# attention builds its qkv bias as cat(q_bias, k_bias, v_bias) with k_bias a zero buffer (exact in any dtype).
_PARAMETER_LIKE_BUFFERS = ("k_bias",)


def cast_parameters(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Parameters to ``dtype``, other buffers kept as they are — what DeepSpeed's bf16 does to the module (RoPE tables
    stay fp32), so a tower built in bf16 computes as one DeepSpeed cast. Unlike DeepSpeed, buffers that join a
    parameter in one op (_PARAMETER_LIKE_BUFFERS) are cast too: a bf16 EVA (ViT-E) would otherwise fail its first
    forward with a float32 bias beside bfloat16 weights."""
    if dtype is not None:
        for param in module.parameters():
            param.data = param.data.to(dtype)
        for sub in module.modules():
            for name in _PARAMETER_LIKE_BUFFERS:
                if isinstance(sub._buffers.get(name), torch.Tensor):
                    sub._buffers[name] = sub._buffers[name].to(dtype)
    return module


def build_vision_tower(cfg: VisionConfig, embed_dim: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> VisionTower:
    """Build the tower for ``cfg.name`` (any timm model) on ``device`` (default CPU), in ``dtype`` (default fp32).

    ``device="meta"`` builds without allocating or running init compute (parameter counting, deferred init);
    pretrained weights are then not loaded, since meta tensors have no storage to load into. With a pretrained
    checkpoint and strict loading the trunk is also built on meta and then materialised straight on ``device`` in
    ``dtype`` from the checkpoint, read tensor by tensor where its layout allows (pretrained.py): no random init
    that would be overwritten (minutes for ViT-E's 4.35B parameters), and no fp32 host copy of the model or of the
    file per rank (~17 GB each for ViT-E, times 8 ranks a node). The head is drawn on the CPU in fp32 and moved,
    so its init does not depend on the device.
    """
    kwargs = _timm_kwargs(cfg)
    target = torch.device(device) if device is not None else torch.device("cpu")
    strict = cfg.pretrained_strict
    load = bool(cfg.pretrained_path) and target.type != "meta"

    trunk: nn.Module | None = None
    if target.type == "meta" or (load and strict):
        with torch.device("meta"):
            trunk = _create_trunk(cfg.name, kwargs)
        if dtype is not None:
            cast_parameters(trunk, dtype)  # free on meta: the storage is then allocated once, in the target dtype
        if target.type != "meta":
            if _buffers_reinitialisable(trunk):
                # Strict loading guarantees every parameter and persistent buffer is overwritten from the checkpoint.
                trunk = trunk.to_empty(device=target)
                reinit_non_persistent_buffers(trunk)
            else:
                trunk = None
    if trunk is None:
        with target:
            trunk = _create_trunk(cfg.name, kwargs)
        if dtype is not None:
            cast_parameters(trunk, dtype)
    tower = VisionTower(trunk, embed_dim, head_device=target, head_dtype=dtype)

    if load:
        assert cfg.pretrained_path is not None
        report = tower.load_pretrained(cfg.pretrained_path, strict=strict)
        logger.info("vision tower %s: %s", cfg.name, report.summary())
    elif cfg.pretrained_path:
        logger.info("meta build of %s: pretrained weights %s not loaded", cfg.name, cfg.pretrained_path)

    if cfg.grad_checkpointing:
        tower.set_grad_checkpointing(True)

    lora_rank = cfg.lora_rank
    if lora_rank > 0:
        apply_lora(tower.trunk, lora_rank, cfg.lora_alpha)
    if cfg.lock or lora_rank > 0:
        tower.lock(cfg.lock_unlocked_groups)
    return tower
