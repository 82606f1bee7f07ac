"""LoRA on the tower's megatron tensor-parallel linears, sharded so that every TP size trains the same function.

Each adapted linear gets a ``lora`` child holding one (A, B) pair per target and a forward hook that adds
``alpha / r * B(A(dropout(x)))`` to the linear's output, so base parameter names (and HF import) stay untouched.

Sharding follows the base linear:

- ColumnParallelLinear (output rows split over TP): A (r x in) is replicated, B (out/tp x r) holds this rank's rows.
  ``A x`` is the same on every rank, but each rank's B only sees its own output rows, so the gradient of ``A x`` is
  a partial sum: megatron's ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) makes
  it whole, keeping the replicas of A identical.
- RowParallelLinear (input columns split over TP): A (r x in/tp) holds this rank's columns and the partial ``A x``
  is summed with ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward); B is
  replicated and sees the full, already reduced output gradient.

Fused linears hold several HF projections. ``linear_qkv`` interleaves per query group [q (np/ng*hd), k (hd), v (hd)]
and TP splits whole groups; ``linear_fc1`` holds [gate_shard, up_shard] on each rank. A target touches only its own
rows; in both layouts a target's local rows are the rank's contiguous chunk of that target's full (TP=1) rows, so
the full matrices are drawn once from a seeded CPU generator and sliced, making the initial adapters (and, with
dropout masks drawn full-width from the default generator, the whole training run) independent of the TP size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
)
from torch import Tensor, nn

LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
_ADAPTER_ATTR = "lora"
_SAVED_FLAGS_ATTR = "_lora_saved_requires_grad"


@dataclass(frozen=True)
class _Layout:
    """How a linear's local output rows are laid out: ``units`` repetitions of the named segments, in order."""

    kind: str  # "column" | "row"
    units: int  # local repetitions (query groups on this rank for linear_qkv, else 1)
    segments: tuple[tuple[str, int], ...]  # (target, local rows per unit)
    in_full: int  # input width of the whole (TP=1) matrix


class LoRAAdapter(nn.Module):
    """The low-rank update of one megatron parallel linear, for the targets among its fused projections.

    A and B are fp32 whatever the base dtype (apply_lora): under a bf16 frozen base they are the master weights —
    the forward casts them to the input's dtype, their gradients and AdamW state stay fp32, so updates smaller than
    bf16's resolution of the weight (~0.4%) are not rounded away.
    """

    def __init__(
        self,
        layout: _Layout,
        targets: Sequence[str],
        rank: int,
        alpha: float,
        dropout: float,
        key: str,
        seed: int,
        tp_rank: int,
        tp_size: int,
        tp_group: dist.ProcessGroup | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.targets = tuple(t for t, _ in layout.segments if t in targets)
        self.rank, self.scaling, self.dropout = rank, alpha / rank, dropout
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.in_local = layout.in_full // tp_size if layout.kind == "row" else layout.in_full
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        sizes = dict(layout.segments)
        for target in self.targets:
            # PEFT's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)) over the full matrix.
            gen = torch.Generator().manual_seed(_derived_seed(seed, f"{key}.{target}"))
            bound = 1.0 / math.sqrt(layout.in_full)
            a_full = (torch.rand(rank, layout.in_full, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            if layout.kind == "row":
                a_local = a_full.chunk(tp_size, dim=1)[tp_rank]
                b_rows = sizes[target]  # replicated; row-parallel linears have a single whole-output segment
            else:
                a_local = a_full
                b_rows = layout.units * sizes[target]
            a = nn.Parameter(a_local.to(dtype=dtype, device=device).contiguous())
            b = nn.Parameter(torch.zeros(b_rows, rank, dtype=dtype, device=device))
            if layout.kind == "row":
                set_tensor_model_parallel_attributes(a, True, 1, 1)
            else:
                set_tensor_model_parallel_attributes(b, True, 0, 1)
            self.A[target], self.B[target] = a, b
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def _dropped(self, x: Tensor) -> Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        # Drawn over the full input width and sliced, from the default generator (shared by TP ranks, as megatron
        # seeds it), so each rank holds its slice of the very mask a TP=1 run would draw.
        width = self.layout.in_full
        keep = torch.rand(*x.shape[:-1], width, device=x.device) >= self.dropout
        if self.layout.kind == "row":
            keep = keep[..., self.tp_rank * self.in_local : (self.tp_rank + 1) * self.in_local]
        return x * keep.to(x.dtype) / (1.0 - self.dropout)

    def delta(self, x: Tensor) -> Tensor:
        """The update to add to the linear's (local, for column-parallel) output for input ``x`` (sq, b, in_local)."""
        if self.layout.kind == "row":
            (target,) = self.targets
            partial = self._dropped(x) @ self.A[target].to(x.dtype).t()
            hidden = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
            return self.scaling * (hidden @ self.B[target].to(x.dtype).t())
        lead = x.shape[:-1]
        pieces = []
        for target, size in self.layout.segments:
            if target in self.targets:
                hidden = self._dropped(x) @ self.A[target].to(x.dtype).t()
                hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
                pieces.append((hidden @ self.B[target].to(x.dtype).t()).view(*lead, self.layout.units, size))
            else:
                pieces.append(x.new_zeros(*lead, self.layout.units, size))
        update = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
        return self.scaling * update.reshape(*lead, -1)

    def weight_delta(self) -> Tensor:
        """``scaling * B A`` laid out like this rank's shard of the base weight (out_local, in_local), in fp32."""
        if self.layout.kind == "row":
            (target,) = self.targets
            return self.scaling * (self.B[target].float() @ self.A[target].float())
        pieces = []
        for target, size in self.layout.segments:
            if target in self.targets:
                product = self.B[target].float() @ self.A[target].float()
                pieces.append(product.view(self.layout.units, size, self.in_local))
            else:
                device = self.A[self.targets[0]].device
                pieces.append(torch.zeros(self.layout.units, size, self.in_local, device=device))
        return self.scaling * torch.cat(pieces, dim=1).reshape(-1, self.in_local)

    def hook(self, _module: nn.Module, args: tuple, output: tuple[Tensor, Tensor | None]) -> tuple:
        out, bias = output
        return out + self.delta(args[0]).to(out.dtype), bias


def _derived_seed(seed: int, key: str) -> int:
    # String seeds hash with SHA-512 inside random.Random: stable across processes, TP sizes and PYTHONHASHSEED.
    return random.Random(f"lora/{seed}/{key}").getrandbits(63)


def _check_linear(linear: nn.Module, cls: type, where: str) -> None:
    # Transformer Engine's fused LayerNorm-linears take the *pre-norm* input, so a hook on them would be wrong.
    if type(linear) is not cls:
        raise TypeError(f"LoRA on {where}: expected megatron's {cls.__name__}, got {type(linear).__name__}")


def _adapted_linears(tower: nn.Module, targets: Sequence[str]) -> Iterable[tuple[str, nn.Module, _Layout]]:
    """(key, linear, layout) for every linear of ``tower`` that holds one of ``targets``."""
    config = tower.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    head_dim = config.kv_channels
    groups = config.num_query_groups or config.num_attention_heads
    if groups % tp:
        # With fewer KV groups than TP ranks megatron all-gathers and re-slices qkv; no rank owns whole groups.
        raise ValueError(f"LoRA needs num_query_groups ({groups}) divisible by the TP size ({tp})")
    q_rows = config.num_attention_heads // groups * head_dim
    ffn_local = config.ffn_hidden_size // tp
    for layer in tower.decoder.layers:
        # layer_number is global (offset by the pipeline stage), so keys and init do not depend on PP either.
        prefix = f"layer{layer.layer_number}"
        attn, mlp = layer.self_attention, layer.mlp
        if {"q", "k", "v"} & set(targets):
            _check_linear(attn.linear_qkv, ColumnParallelLinear, f"{prefix}.linear_qkv")
            segments = (("q", q_rows), ("k", head_dim), ("v", head_dim))
            layout = _Layout("column", groups // tp, segments, config.hidden_size)
            yield f"{prefix}.linear_qkv", attn.linear_qkv, layout
        if "o" in targets:
            _check_linear(attn.linear_proj, RowParallelLinear, f"{prefix}.linear_proj")
            layout = _Layout("row", 1, (("o", config.hidden_size),), config.num_attention_heads * head_dim)
            yield f"{prefix}.linear_proj", attn.linear_proj, layout
        if {"gate", "up"} & set(targets):
            if not config.gated_linear_unit:
                raise ValueError("LoRA targets gate/up need a gated MLP (SwiGLU)")
            _check_linear(mlp.linear_fc1, ColumnParallelLinear, f"{prefix}.linear_fc1")
            layout = _Layout("column", 1, (("gate", ffn_local), ("up", ffn_local)), config.hidden_size)
            yield f"{prefix}.linear_fc1", mlp.linear_fc1, layout
        if "down" in targets:
            _check_linear(mlp.linear_fc2, RowParallelLinear, f"{prefix}.linear_fc2")
            layout = _Layout("row", 1, (("down", config.hidden_size),), config.ffn_hidden_size)
            yield f"{prefix}.linear_fc2", mlp.linear_fc2, layout


def lora_adapters(tower: nn.Module) -> dict[str, LoRAAdapter]:
    """Module name -> adapter, for every adapter ``apply_lora`` attached to ``tower``."""
    return {name: module for name, module in tower.named_modules() if isinstance(module, LoRAAdapter)}


def apply_lora(
    tower: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int | None = None,
) -> list[nn.Parameter]:
    """Freeze every base parameter of ``tower`` and attach LoRA adapters; return the (trainable) LoRA parameters.

    ``targets`` names HF projections (q, k, v, o, gate, up, down). ``seed`` (default ``tower.cfg.seed``) fixes the
    init; it does not depend on TP/PP. Requires megatron parallel_state; sequence parallelism is not supported.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or list(targets)} invalid; choose from {', '.join(LORA_TARGETS)}")
    if rank < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA rank must be >= 1 and dropout in [0, 1); got rank={rank}, dropout={dropout}")
    if lora_adapters(tower):
        raise RuntimeError("apply_lora: the tower already carries LoRA adapters; merge_lora first")
    if tower.config.sequence_parallel:
        raise ValueError("LoRA adapters assume sequence_parallel=False (inputs of column-parallel linears are whole)")
    seed = tower.cfg.seed if seed is None else seed
    setattr(tower, _SAVED_FLAGS_ATTR, {name: p.requires_grad for name, p in tower.named_parameters()})
    tower.requires_grad_(False)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params: list[nn.Parameter] = []
    for key, linear, layout in list(_adapted_linears(tower, targets)):
        adapter = LoRAAdapter(
            layout, targets, rank, alpha, dropout, key, seed, tp_rank, tp_size, tp_group,
            dtype=torch.float32, device=linear.weight.device,
        )
        adapter.train(tower.training)
        linear.add_module(_ADAPTER_ATTR, adapter)
        adapter._hook = linear.register_forward_hook(adapter.hook)
        params.extend(adapter.parameters())
    return params


@torch.no_grad()
def merge_lora(tower: nn.Module) -> int:
    """Fold every adapter into its base weight shard, remove the adapters and hooks, restore the requires_grad flags
    ``apply_lora`` found; return how many linears were merged. Rank-local: each TP rank merges its own shard."""
    merged = 0
    for name, adapter in lora_adapters(tower).items():
        linear = tower.get_submodule(name.rsplit(".", 1)[0])
        # Summed in fp32 and rounded once: a bf16 base would otherwise round the delta, then the sum.
        linear.weight.copy_(linear.weight.float() + adapter.weight_delta())
        adapter._hook.remove()
        delattr(linear, _ADAPTER_ATTR)
        merged += 1
    saved = getattr(tower, _SAVED_FLAGS_ATTR, None)
    if saved is not None:
        for pname, param in tower.named_parameters():
            param.requires_grad_(saved.get(pname, param.requires_grad))
        delattr(tower, _SAVED_FLAGS_ATTR)
    return merged


def lora_split_dim(adapter: LoRAAdapter, which: str) -> int | None:
    """The dim along which this LoRA matrix is TP-split, or None when replicated."""
    if adapter.layout.kind == "row":
        return 1 if which == "A" else None
    return 0 if which == "B" else None


@torch.no_grad()
def gather_lora_state(tower: nn.Module) -> dict[str, Tensor]:
    """TP-independent LoRA state: ``{param name: full (TP=1) matrix}`` on CPU. Collective over the TP group.

    Column-parallel B of linear_qkv / linear_fc1 is reassembled per target, so the result of a TP=2 run equals a
    TP=1 run's: it is what a checkpoint or HF export of the adapters should store.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    state: dict[str, Tensor] = {}
    for name, adapter in lora_adapters(tower).items():
        for which, table in (("A", adapter.A), ("B", adapter.B)):
            for target, param in table.items():
                dim = lora_split_dim(adapter, which)
                full = param.detach()
                if dim is not None and tp_size > 1:
                    parts = [torch.empty_like(full) for _ in range(tp_size)]
                    dist.all_gather(parts, full.contiguous(), group=group)
                    full = torch.cat(parts, dim=dim)
                state[f"{name}.{which}.{target}"] = full.cpu().clone()
    return state


def _local_part(adapter: LoRAAdapter, which: str, full: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's part of a full (TP=1) A or B matrix of ``adapter``."""
    dim = lora_split_dim(adapter, which)
    return full.chunk(tp_size, dim=dim)[tp_rank] if dim is not None else full


def _fill(adapters: dict[str, LoRAAdapter], state: dict[str, Tensor]) -> None:
    """Copy a :func:`gather_lora_state` dict into ``adapters`` (module name -> adapter); every key must match."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    expected: set[str] = set()
    for name, adapter in adapters.items():
        for which, table in (("A", adapter.A), ("B", adapter.B)):
            for target, param in table.items():
                key = f"{name}.{which}.{target}"
                expected.add(key)
                if key not in state:
                    raise KeyError(f"LoRA state lacks {key}")
                full = state[key]
                local = _local_part(adapter, which, full, tp_rank, tp_size)
                if local.shape != param.shape:
                    raise ValueError(f"LoRA state {key}: shape {tuple(full.shape)} does not fit {tuple(param.shape)}")
                param.copy_(local)
    extra = sorted(set(state) - expected)
    if extra:
        raise KeyError(f"LoRA state holds entries this tower has no adapter for: {extra[:5]}")


@torch.no_grad()
def load_lora_state(tower: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a :func:`gather_lora_state` dict (any TP size) into this rank's adapter shards."""
    _fill(lora_adapters(tower), state)


@torch.no_grad()
def merge_lora_state(
    tower: nn.Module, state: dict[str, Tensor], rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS
) -> int:
    """Fold a :func:`gather_lora_state` dict (this rank's module names, full matrices, any TP size) into the base
    weight shards, ``W += alpha / rank * B A`` as :func:`merge_lora` computes it; adapters attached to ``tower``
    stay attached and untouched. Returns how many linears were merged.

    What a resumed run needs to rebuild a base that an earlier LoRA was merged into (stage 1's MNTP) while the
    checkpoint's own adapters are already in place.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    names = {id(module): name for name, module in tower.named_modules()}
    standalone: dict[str, tuple[nn.Module, LoRAAdapter]] = {}
    for key, linear, layout in _adapted_linears(tower, targets):
        # Built only to hold the matrices (its random init is overwritten) and to lay the delta out as merge_lora does.
        adapter = LoRAAdapter(layout, targets, rank, alpha, 0.0, key, 0, tp_rank, tp_size, tp_group,
                              dtype=torch.float32, device=linear.weight.device)
        standalone[f"{names[id(linear)]}.{_ADAPTER_ATTR}"] = (linear, adapter)
    _fill({name: adapter for name, (_, adapter) in standalone.items()}, state)
    for linear, adapter in standalone.values():
        linear.weight.copy_(linear.weight.float() + adapter.weight_delta())
    return len(standalone)


def concat_lora_states(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
    """One LoRA of rank ``r1 + r2`` whose update is the sum of two (:func:`gather_lora_state` dicts, same keys):
    A stacked over rows, B over columns, so ``B A = B1 A1 + B2 A2``. Written with ``alpha = alpha1 + alpha2`` it
    applies the same update when both had one scaling ``alpha1 / r1 = alpha2 / r2`` (the caller's to ensure)."""
    if set(first) != set(second):
        raise KeyError(f"LoRA states adapt different matrices: {sorted(set(first) ^ set(second))[:5]}")
    out: dict[str, Tensor] = {}
    for key, value in first.items():
        which = key.rsplit(".", 2)[-2]
        if which not in ("A", "B"):
            raise KeyError(f"LoRA state key {key} is neither an A nor a B matrix")
        out[key] = torch.cat([value, second[key]], dim=0 if which == "A" else 1)
    return out
