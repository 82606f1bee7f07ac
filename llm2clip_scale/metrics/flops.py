"""Model FLOPs of a training step and the peak FLOP/s of the GPU it runs on: what MFU is made of.

Conventions (PaLM's, Chowdhery et al. 2022, appendix B): a matmul of (n x k) by (k x m) is 2nkm FLOPs and nothing
else is counted (norms, softmax, activations, adds and the loss are < 1% here); attention's two batched matmuls
(scores, weighted sum) are 4·T²·d per layer for a sequence of T tokens and attention width d. *Model* FLOPs are
the forward pass plus the backward the trainable parameters need — for a matmul 1x its forward for the input
gradient (when anything before it trains) and 1x for the weight gradient (when its weight trains), 2x for the
weight-free attention core when gradients flow through it. So a fully trainable tower costs 3x its forward, a frozen
LLM that only feeds a LoRA's gradient ~2x, a frozen LLM under no_grad 1x. *Hardware* FLOPs add what is computed
twice: activation checkpointing's second forward of each checkpointed block (less its last matmul, which torch's
non-reentrant checkpoint does not re-run), gradient caching's first (no-grad) LLM pass, and caption padding; MFU
uses model FLOPs. Every formula is checked against torch's FlopCounterMode on real modules (tests/test_flops.py).

Vision towers: the timm model is built on the meta device (no memory, no init) and every nn.Linear / nn.Conv2d is
counted with the tokens it sees — the patch grid for the patch embedding, all tokens in the blocks and in an
attention pool's key/value projection, the pool's latent queries for the rest of the pool, one token after pooling.
The LLM: 2 x matmul parameters (q/k/v, o, gate/up, down; the embedding is a lookup and the embedder has no LM head)
per token plus 4·L·T²·d per caption of T real tokens (padding is not model work).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llm2clip_scale.config.schema import AdapterConfig, Config, LLMConfig, trains_offline

log = logging.getLogger("llm2clip_scale.train")

# Dense peak TFLOP/s per GPU (no 2:4 sparsity) from NVIDIA's datasheets, which quote tensor-core figures with
# sparsity: dense = half. A100 (SXM and PCIe alike): BF16 312, TF32 156, FP32 19.5. H100 SXM: BF16 1,979*, TF32
# 989*, FP32 67; H100 PCIe: 1,513*, 756*, 51; H100 NVL: 1,671*, 835*, 60. H200 (SXM) = H100 SXM; H200 NVL = H100 NVL;
# GH200's GPU = H100 SXM. HGX B200: BF16 4.5 PFLOPS*, TF32 2.2 PFLOPS*, FP32 75; GB200: 5*, 2.5*, 80 (* = sparse).
# "fp32" is the CUDA-core rate (matmuls with TF32 off, torch's default), "tf32" with TF32 on.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 SXM": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "GB200": {"bf16": 2500.0, "tf32": 1250.0, "fp32": 80.0},
}
# torch.cuda.get_device_name substrings -> table row, most specific first: the SXM H100 calls itself
# "NVIDIA H100 80GB HBM3" (no "SXM"), "GH200" contains "H200" and "GB200" contains "B200".
_NAME_MATCHES: tuple[tuple[str, str], ...] = (
    ("GH200", "GH200"), ("GB200", "GB200"), ("H200 NVL", "H200 NVL"), ("H200", "H200"), ("H100 NVL", "H100 NVL"),
    ("H100 PCIE", "H100 PCIe"), ("H100", "H100 SXM"), ("A100", "A100"), ("B200", "B200"),
)


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of the GPU ``torch.cuda.get_device_name`` calls ``device_name`` for matmuls in ``dtype``
    (bf16 | tf32 | fp32); None when the GPU is not in PEAK_TFLOPS (and for a CPU)."""
    upper = device_name.upper()
    for needle, row in _NAME_MATCHES:
        if needle.upper() in upper:
            return PEAK_TFLOPS[row].get(dtype)
    return None


def matmul_dtype(precision: str) -> str:
    """The peak that applies to ``train.precision``: bf16, or fp32 matmuls at the TF32 rate when torch allows it."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


# ------------------------------------------------------------------------------------------- the backward walker


@dataclass(frozen=True)
class _Term:
    """One matmul (or a 0-FLOP marker for a trainable norm/bias/embedding), in forward order."""

    flops: float  # forward FLOPs
    trainable: bool  # gets a gradient (a 0-FLOP marker only opens the gradient flow)
    attention: bool = False  # the weight-free attention core: backward 2x when gradients flow through it
    stem: bool = False  # its input is data (images): never an input gradient
    group: str | None = None  # activation-checkpointed block it belongs to
    same_input: bool = False  # reads the previous ordinary term's input (a LoRA A beside its base linear)


def _train_flops(terms: Iterable[_Term], flowing: bool = False) -> tuple[float, float, float]:
    """(forward, model = forward + needed backward, hardware = model + checkpoint recompute) of ``terms``.
    ``flowing``: the input already carries a gradient (e.g. LLM embeddings under a stage-2 LoRA)."""
    forward = backward = 0.0
    group_flops: dict[str, float] = {}
    last_matmul: dict[str, float] = {}
    recomputed: set[str] = set()
    input_flow = flowing
    for term in terms:
        if not term.same_input:
            input_flow = flowing
        if term.attention:
            back = 2 * term.flops if input_flow else 0.0
        else:
            back = (term.flops if input_flow and not term.stem else 0.0) + (term.flops if term.trainable else 0.0)
        forward += term.flops
        backward += back
        flowing = flowing or term.trainable
        if term.group is not None:
            group_flops[term.group] = group_flops.get(term.group, 0.0) + term.flops
            if term.flops and not term.attention:
                last_matmul[term.group] = term.flops
            if flowing:  # the block's output needs a gradient: checkpointing re-runs its forward
                recomputed.add(term.group)
    # torch's non-reentrant checkpoint (timm's default) stops re-running a block once the tensors its backward saved
    # are back: the block's last matmul (MLP fc2) saves only its input, so it is not run again (a layer scale after
    # it would save its output, and this would count one matmul too few).
    recompute = sum(group_flops[g] - last_matmul.get(g, 0.0) for g in recomputed)
    return forward, forward + backward, forward + backward + recompute


# ----------------------------------------------------------------------------------------------- vision towers


def _meta_trunk(name: str, image_size: int | None, timm_kwargs: dict | None) -> nn.Module:
    import timm

    kwargs = {**({"img_size": image_size} if image_size else {}), **(timm_kwargs or {})}
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _trunk_tokens(trunk: nn.Module, patch_dropout: float = 0.0) -> tuple[int, int]:
    """(patch-grid tokens, tokens in the blocks); timm's PatchDropout keeps max(1, int(grid·(1 - p))) patches."""
    if not hasattr(trunk, "patch_embed") or not hasattr(trunk, "blocks"):
        raise ValueError(f"no FLOP model for {type(trunk).__name__}: it covers ViT-family timm towers "
                         "(patch_embed + blocks)")
    grid = int(math.prod(trunk.patch_embed.grid_size))
    kept = max(1, int(grid * (1.0 - patch_dropout))) if patch_dropout > 0 else grid
    return grid, kept + int(getattr(trunk, "num_prefix_tokens", 0))


def _trunk_terms(trunk: nn.Module, grid: int, tokens: int, checkpointing: bool = False) -> list[_Term]:
    """The trunk's matmuls in forward order (timm registers modules in the order they run)."""
    from llm2clip_scale.models.vision.timm_tower import LoRALinear

    def tokens_of(name: str) -> int:
        if name.startswith("patch_embed."):
            return grid
        if name.startswith("blocks.") or name == "attn_pool.kv" or name.startswith("attn_pool.kv."):
            return tokens
        if name.startswith("attn_pool."):
            return int(trunk.attn_pool.latent_len)
        return 1  # after pooling (fc_norm, head)

    terms: list[_Term] = []
    wrapped: list[str] = []  # LoRALinear names: their base Linear is counted with the wrapper
    stem_done = False
    for name, module in trunk.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        parts = name.split(".")
        group = ".".join(parts[:2]) if checkpointing and parts[0] == "blocks" and len(parts) > 1 else None
        if name.endswith("attn.proj") or name == "attn_pool.proj":  # the attention core runs just before
            attn = trunk.get_submodule(name.rsplit(".", 1)[0])
            queries = tokens if parts[0] == "blocks" else int(trunk.attn_pool.latent_len)
            terms.append(_Term(4.0 * queries * tokens * attn.num_heads * attn.head_dim, False, attention=True,
                               group=group))
        n = tokens_of(name)
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, LoRALinear):
            wrapped.append(name)
            base = module.base
            terms.append(_Term(2.0 * base.weight.numel() * n, base.weight.requires_grad, group=group))
            terms.append(_Term(2.0 * module.lora_A.numel() * n, module.lora_A.requires_grad, group=group,
                               same_input=True))
            terms.append(_Term(2.0 * module.lora_B.numel() * n, module.lora_B.requires_grad, group=group))
            own = {"bias": base.bias} if base.bias is not None else {}
        elif isinstance(module, nn.Linear | nn.Conv2d):
            stem = not stem_done and name.startswith("patch_embed")
            stem_done = stem_done or stem
            terms.append(_Term(2.0 * module.weight.numel() * n, module.weight.requires_grad, stem=stem, group=group))
            own.pop("weight")
        if any(p.requires_grad for p in own.values()):
            terms.append(_Term(0.0, True, group=group))
    return terms


def vision_forward_flops(name: str, image_size: int | None, timm_kwargs: dict | None = None
                         ) -> tuple[float, int, int]:
    """(forward FLOPs per image, parameters, tokens) of timm model ``name`` (pooled features, no classifier) at
    ``image_size`` (None: the model's default): its matmuls with the tokens each sees, plus 4·L·T²·d attention."""
    trunk = _meta_trunk(name, image_size, timm_kwargs)
    grid, tokens = _trunk_tokens(trunk)
    flops = sum(term.flops for term in _trunk_terms(trunk, grid, tokens))
    return flops, sum(p.numel() for p in trunk.parameters()), tokens


def _vision_tower_flops(cfg: Config) -> tuple[float, float, float, float]:
    """(training forward, model, hardware, eval forward) FLOPs per image of the configured stage-2 tower: built on
    meta by the training builder itself, so lock, LoRA, patch dropout and the head are what training has."""
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    tower = build_vision_tower(cfg.model.vision, cfg.model.embed_dim, device="meta")
    grid, train_tokens = _trunk_tokens(tower.trunk, cfg.model.vision.patch_dropout)
    head = _Term(2.0 * tower.head.weight.numel(), True)
    train = _trunk_terms(tower.trunk, grid, train_tokens, cfg.model.vision.grad_checkpointing) + [head]
    full = _trunk_tokens(tower.trunk)[1]
    eval_forward = sum(t.flops for t in _trunk_terms(tower.trunk, grid, full)) + head.flops
    return (*_train_flops(train), eval_forward)


# ----------------------------------------------------------------------------------------------- adapter, LLM


def adapter_forward_flops(adapter_cfg: AdapterConfig, embed_dim: int) -> float:
    """Forward FLOPs of the LLM2CLIP adapter on one embedding: residual MLP blocks d -> e·d -> d, then d -> embed."""
    d, hidden = adapter_cfg.input_dim, adapter_cfg.expansion * adapter_cfg.input_dim
    return 2.0 * (adapter_cfg.num_blocks * 2 * d * hidden + d * embed_dim)


def _llm_linears(llm: LLMConfig) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """One layer's linears in forward order: (name, input width, [(LoRA target, output rows)])."""
    h, kv = llm.hidden_size, llm.hidden_size // llm.num_attention_heads
    groups = llm.num_query_groups or llm.num_attention_heads
    return [("qkv", h, [("q", llm.num_attention_heads * kv), ("k", groups * kv), ("v", groups * kv)]),
            ("o", llm.num_attention_heads * kv, [("o", h)]),
            ("fc1", h, [("gate", llm.ffn_hidden_size), ("up", llm.ffn_hidden_size)]),
            ("fc2", llm.ffn_hidden_size, [("down", h)])]


def llm_matmul_params(llm: LLMConfig) -> int:
    """Weights that multiply every token: q/k/v, o, gate/up and down of every layer (Llama-3-8B: 6.98e9)."""
    return llm.num_layers * sum(width * sum(rows for _, rows in outs) for _, width, outs in _llm_linears(llm))


def _lengths(tokens: float | Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(sum of T, sum of T²) over captions: a number is one caption of that length."""
    if isinstance(tokens, int | float):
        return float(tokens), float(tokens) ** 2
    values = torch.as_tensor(tokens, dtype=torch.float64)
    return float(values.sum()), float((values * values).sum())


def llm_forward_flops(llm_cfg: LLMConfig, tokens: float | Sequence[float] | torch.Tensor) -> float:
    """Forward FLOPs of the LLM tower on captions of ``tokens`` real tokens (a number: one caption; a sequence:
    summed over captions): 2·(matmul params)·T + 4·L·T²·d per caption."""
    total, squares = _lengths(tokens)
    return 2.0 * llm_matmul_params(llm_cfg) * total + 4.0 * llm_cfg.num_layers * llm_cfg.hidden_size * squares


def _llm_terms(llm: LLMConfig, total: float, squares: float, lora: bool) -> list[_Term]:
    """The tower's matmuls in forward order for captions with sum T = total, sum T² = squares; with ``lora`` the
    base is frozen and ``llm.lora_targets`` carry trainable (A: r x in, B: rows x r) factors."""
    attn = _Term(4.0 * llm.hidden_size * squares, False, attention=True)
    layer: list[_Term] = []
    for name, width, outs in _llm_linears(llm):
        if name == "o":
            layer.append(attn)
        layer.append(_Term(2.0 * width * sum(rows for _, rows in outs) * total, False))
        adapted = [rows for target, rows in outs if lora and target in llm.lora_targets]
        # Every target's A reads the linear's input; its B reads A's output.
        layer += [_Term(2.0 * llm.lora_rank * width * total, True, same_input=True) for _ in adapted]
        layer += [_Term(2.0 * rows * llm.lora_rank * total, True) for rows in adapted]
    return layer * llm.num_layers


def _llm_coefficients(llm: LLMConfig, lora: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """(model, hardware) LLM FLOPs as (per token, per squared token) of a caption: every term is linear in sum T or
    in sum T². Frozen: the no-grad forward. LoRA (gradient caching, train/grad_cache.py): a no-grad pass whose
    output is used, then a replayed forward + backward into the LoRA — model = forward + backward, hardware adds the
    replay."""
    linear = [_train_flops(_llm_terms(llm, 1.0, 0.0, lora)), _train_flops(_llm_terms(llm, 0.0, 1.0, lora))]
    if not lora:
        return (linear[0][0], linear[1][0]), (linear[0][0], linear[1][0])
    return (linear[0][1], linear[1][1]), (linear[0][0] + linear[0][1], linear[1][0] + linear[1][1])


# --------------------------------------------------------------------------------------------------- per sample


@dataclass(frozen=True)
class FlopModel:
    """A stage's FLOPs: per sample for what does not depend on captions, per caption (a·T + b·T²) for the LLM."""

    parts: dict[str, float]  # model FLOPs per sample of vision, adapter, teacher
    fixed_hardware: float  # hardware FLOPs per sample of those parts
    llm_model: tuple[float, float] = (0.0, 0.0)  # per caption: (per token, per squared token); (0, 0) offline
    llm_hardware: tuple[float, float] = (0.0, 0.0)
    texts_per_sample: int = 1
    extra: dict[str, float] = field(default_factory=dict)  # e.g. the vision forward, for reports

    @property
    def fixed_model(self) -> float:
        return sum(self.parts.values())

    def llm(self, total: float, squares: float, hardware: bool = False) -> float:
        a, b = self.llm_hardware if hardware else self.llm_model
        return a * total + b * squares

    def per_sample(self, caption_tokens: float | None) -> dict[str, float]:
        """Model FLOPs per sample by part, their sum ("model") and hardware FLOPs ("hardware"), with every caption
        ``caption_tokens`` long (None: the LLM is not counted)."""
        t = caption_tokens or 0.0
        llm, llm_hw = (self.texts_per_sample * self.llm(t, t * t, hw) for hw in (False, True))
        return {**self.parts, "llm": llm, "model": self.fixed_model + llm, "hardware": self.fixed_hardware + llm_hw,
                **self.extra}


def flop_model(cfg: Config) -> FlopModel:
    """The FLOP model of ``cfg``'s stage (raises ValueError for a vision tower it does not cover)."""
    stage, llm = cfg.train.stage, cfg.model.llm
    adapter = adapter_forward_flops(cfg.model.adapter, cfg.model.embed_dim)
    if stage == "llm2clip_cc":  # query, positive (and a hard negative) per pair, all through the LoRA tower
        model, hardware = _llm_coefficients(llm, lora=True)
        return FlopModel({}, 0.0, model, hardware, 3 if cfg.stage1.hard_negatives else 2)
    # The adapter's LayerNorms train, so every adapter matmul needs its input gradient too: 3x its forward.
    online = not trains_offline(cfg.data)
    model, hardware = _llm_coefficients(llm, lora=stage == "stage2" and llm.lora_rank > 0)
    if not online:
        model = hardware = (0.0, 0.0)
    if stage == "proclip_inherit":  # the CLIP text teacher's forward is not counted (<2% next to an 8B LLM)
        return FlopModel({"adapter": 3 * adapter}, 3 * adapter, model, hardware)
    forward, vision, vision_hw, eval_forward = _vision_tower_flops(cfg)
    teacher = eval_forward if cfg.train.self_distill_weight > 0 else 0.0  # ProCLIP's EMA teacher: forward only
    return FlopModel({"vision": vision, "adapter": 3 * adapter, "teacher": teacher},
                     vision_hw + 3 * adapter + teacher, model, hardware, extra={"vision_forward": forward})


def training_flops_per_sample(cfg: Config, caption_tokens: float | None) -> dict[str, float]:
    """Model FLOPs per training sample of ``cfg``'s stage by part (vision, adapter, teacher, llm), their sum
    ("model", what MFU counts) and "hardware" (with recomputation); ``caption_tokens``: the mean real tokens of a
    caption (the attention term uses its square), None to leave the LLM out."""
    return flop_model(cfg).per_sample(caption_tokens)


# ------------------------------------------------------------------------------------------- the loop's counter


def caption_masks(batch: object) -> Iterator[torch.Tensor]:
    """Every host-side ``*attention_mask`` in a batch (a dict, or a list of micro-batch dicts)."""
    if isinstance(batch, list | tuple):
        for item in batch:
            yield from caption_masks(item)
    elif isinstance(batch, dict):
        for key, value in batch.items():
            if key.endswith("attention_mask") and isinstance(value, torch.Tensor):
                yield value


class StepFlops:
    """Model and hardware FLOPs of one GPU's step, counted on the host from the batch before it moves to the device
    (no synchronisation), and the rates the loop logs.

    Vision/adapter: the rank's global_batch / world samples. LLM: the rank's own captions (attention masks summed on
    the CPU tensors the loader made). A model-parallel group embeds the union of its members' captions once, each GPU
    doing 1/(TP·PP) of it, so a rank's own captions are its share on average; stage 1 hands every TP/PP rank of a
    replica the same pairs, so there a rank's share is its batch / (TP·PP). Hardware FLOPs count each batch padded to
    its longest caption (under TP the group pads to its longest, which one rank cannot see).
    """

    def __init__(self, cfg: Config, world_size: int, device: torch.device) -> None:
        self.enabled = True
        try:
            self.model = flop_model(cfg)
        except ValueError as err:
            log.warning("model FLOPs and MFU are not logged: %s", err)
            self.enabled = False
            return
        self.samples = cfg.train.global_batch / world_size
        shared = cfg.train.stage == "llm2clip_cc"
        self.llm_share = 1.0 / (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel) if shared else 1.0
        self.peak = None
        if device.type == "cuda":
            self.peak = device_peak_tflops(torch.cuda.get_device_name(device), matmul_dtype(cfg.train.precision))

    def per_sample(self) -> dict[str, float]:
        """Logged once at the start: the caption-independent parts, and the LLM's FLOPs per caption token."""
        if not self.enabled:
            return {}
        out = dict(self.model.parts)
        if self.model.llm_model != (0.0, 0.0):
            out["llm_per_caption_token"] = self.model.llm_model[0]
        return {**out, "model_without_llm": self.model.fixed_model, **self.model.extra}

    def count(self, batch: object) -> tuple[float, float]:
        """(model, hardware) FLOPs of this GPU's step on ``batch`` (host tensors; device tensors are skipped)."""
        if not self.enabled:
            return 0.0, 0.0
        model = self.samples * self.model.fixed_model
        hardware = self.samples * self.model.fixed_hardware
        if self.model.llm_model != (0.0, 0.0):
            for mask in caption_masks(batch):
                if mask.device.type != "cpu" or mask.numel() == 0:
                    continue
                lengths = mask.sum(dim=1, dtype=torch.float64)
                padded = float(lengths.max())
                model += self.llm_share * self.model.llm(float(lengths.sum()), float((lengths * lengths).sum()))
                rows = lengths.numel()
                hardware += self.llm_share * self.model.llm(rows * padded, rows * padded**2, hardware=True)
        return model, hardware

    def rates(self, flops: tuple[float, float], seconds: float) -> dict[str, float]:
        """model_tflops, hardware_tflops (per GPU per second) and mfu (only where the GPU's peak is known)."""
        if not self.enabled or seconds <= 0:
            return {}
        out = {"model_tflops": flops[0] / seconds / 1e12, "hardware_tflops": flops[1] / seconds / 1e12}
        if self.peak:
            out["mfu"] = out["model_tflops"] / self.peak
        return out
