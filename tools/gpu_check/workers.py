"""Probes that need a process of their own: the backend, TE vs local spec, bf16 LoRA state, host syncs. Each runs
as ``first_gpu_check.py --worker NAME --spec JSON``, which prints its returned dict as one RESULT_TAG line of JSON."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .context import REPO

if TYPE_CHECKING:
    from llm2clip_scale.distributed.topology import Topology


def init_world(backend: str) -> Topology:
    """A world of one (Context.env gives every process its own rendezvous port), so runs can share the node."""
    from llm2clip_scale.distributed.topology import build_topology, init_distributed

    init_distributed(backend)
    return build_topology(1, 1)


def tensor_facts(tensors: list) -> tuple[list[str], list[str]]:
    """The dtypes and the device types among ``tensors``, sorted: what the probes report and the checks judge."""
    return (sorted({str(t.dtype).removeprefix("torch.") for t in tensors}), sorted({t.device.type for t in tensors}))


def worker_backend(spec: dict) -> dict:
    import deepspeed.accelerator
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as mrandom

    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.distributed import cpu_compat
    from llm2clip_scale.distributed.backend import resolve_backend
    from llm2clip_scale.models.llm.tower import build_text_tower

    auto = resolve_backend("auto")
    auto_slurm = resolve_backend("auto", env={"SLURM_JOB_GPUS": "0"})
    topo = init_world(auto)
    value = torch.ones(4, device=topo.device)
    dist.all_reduce(value)
    patched = [name for name, fake in (("torch.cuda.current_device", cpu_compat._cpu_device),
                                       ("torch.cuda.synchronize", cpu_compat._noop),
                                       ("torch.cuda.empty_cache", cpu_compat._noop))
               if getattr(torch.cuda, name.rsplit(".", 1)[1]) is fake]
    enabled_before_tower = cpu_compat.is_enabled()
    tower = build_text_tower(LLMConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                       ffn_hidden_size=128, vocab_size=128, max_seq_len=16))
    ids = torch.randint(0, 128, (2, 8), device=topo.device)
    with torch.no_grad():
        pooled = tower(ids, torch.ones_like(ids))
    return {
        "auto": auto, "auto_with_slurm_gpus": auto_slurm, "process_group": dist.get_backend(),
        "topology_device": topo.device.type, "all_reduce_device": value.device.type,
        "all_reduce_value": float(value[0]), "cpu_compat_enabled": enabled_before_tower, "patched": patched,
        "rng_tracker": type(mrandom.get_cuda_rng_tracker()).__name__,
        "deepspeed_accelerator": deepspeed.accelerator.get_accelerator().device_name(),
        "tower_device": pooled.device.type, "cpu_compat_after_tower": cpu_compat.is_enabled(),
    }


# The Transformer Engine spec fuses each pre-norm into the next linear; init_seeded reads the same HF tensor for both.
TE_NAME_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def worker_te_vs_local(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config.schema import LLMConfig
    from llm2clip_scale.models.llm.tower import build_text_tower

    topo = init_world(spec["backend"])
    base = LLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=128, max_seq_len=32, seed=1234)  # tests/test_llm_tower.py's tower
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 4, 12, 1, 16])
    ids = torch.randint(0, base.vocab_size, (len(lengths), 16), generator=gen).to(topo.device)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long().to(topo.device)  # right padding, junk ids behind it
    cases, weights = [], {"equal": 0, "unequal": [], "unmapped": [], "te_only": []}
    for dtype in (torch.float32, torch.bfloat16):
        for bidirectional in (True, False):
            cfg = dataclasses.replace(base, bidirectional=bidirectional)
            local = build_text_tower(dataclasses.replace(cfg, layer_spec="local"), params_dtype=dtype)
            other = build_text_tower(dataclasses.replace(cfg, layer_spec="local", seed=cfg.seed + 1),
                                     params_dtype=dtype)
            try:
                te = build_text_tower(dataclasses.replace(cfg, layer_spec=spec["spec"]), params_dtype=dtype)
            except Exception as err:  # e.g. a TE parameter init_seeded has no HF name for: that is the finding
                return {"error": f"{type(err).__name__}: {err}"}
            if dtype == torch.float32 and bidirectional:
                local_params = dict(local.named_parameters())
                for name, param in te.named_parameters():
                    prefix, _, rest = name.partition("decoder.layers.")
                    layer, _, leaf = rest.partition(".")
                    twin = name
                    if name not in local_params and leaf in TE_NAME_TO_LOCAL:
                        twin = f"{prefix}decoder.layers.{layer}.{TE_NAME_TO_LOCAL[leaf]}"
                    if twin not in local_params:
                        weights["unmapped"].append(name)
                    elif torch.equal(param, local_params[twin]):
                        weights["equal"] += 1
                        if twin != name:
                            weights["te_only"].append(leaf)
                    else:
                        weights["unequal"].append(name)
                weights["te_only"] = sorted(set(weights["te_only"]))
            with torch.no_grad():
                want, got, far = (tower(ids, mask).float() for tower in (local, te, other))
            scale = want.abs().max().item()
            cases.append({"dtype": str(dtype).removeprefix("torch."), "bidirectional": bidirectional,
                          "rel": (got - want).abs().max().item() / scale,
                          "control_rel": (far - want).abs().max().item() / scale})
    return {"cases": cases, "weights": weights}


def worker_lora_bf16(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.schema import Config
    from llm2clip_scale.train.llm2clip_cc import LLM2CLIPCaptionContrastiveTask
    from llm2clip_scale.train.loop import run

    cfg = load_config(REPO / "configs" / "llm2clip_cc_tiny.yaml", spec["overrides"])
    grads: list[dict] = []

    class Probe(LLM2CLIPCaptionContrastiveTask):
        """Stage 1 as the loop runs it, looking at the LoRA gradients when the optimizer consumes them (the
        trainer clears them right after)."""

        def build(self, cfg: Config, topo: Topology) -> None:
            super().build(cfg, topo)
            self.initial = [p.detach().clone() for p in self.lora.params]
            optimizer = self.lora.optimizer
            step = optimizer.step  # the scheduler's wrapper: keep it, so the lr schedule still counts steps

            def probed_step(*args: Any, **kwargs: Any) -> Any:
                present = [p.grad for p in self.lora.params if p.grad is not None]
                dtypes, devices = tensor_facts(present)
                grads.append({"dtypes": dtypes, "devices": devices,
                              "missing": len(self.lora.params) - len(present)})
                return step(*args, **kwargs)

            optimizer.step = probed_step

    task = Probe()
    result = run(cfg, task)
    lora = task.lora.params
    lora_ids = {id(p) for p in lora}
    base = [p for p in task.tower.parameters() if id(p) not in lora_ids]
    state = [t for p in lora for t in task.lora.optimizer.state[p].values()
             if torch.is_tensor(t) and t.is_floating_point() and t.numel() == p.numel()]
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(lora, task.initial))
    losses = [round(r["loss"], 4) for r in (json.loads(line) for line in
              (Path(cfg.logging.dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    lora_dtypes, lora_devices = tensor_facts(lora)
    state_dtypes, state_devices = tensor_facts(state)
    return {"base_matrix_dtypes": tensor_facts([p for p in base if p.ndim >= 2])[0],
            "base_vector_dtypes": tensor_facts([p for p in base if p.ndim < 2])[0], "lora_dtypes": lora_dtypes,
            "lora_devices": lora_devices,
            "lora_params": sum(p.numel() for p in lora), "grads": grads, "state_dtypes": state_dtypes,
            "state_devices": state_devices, "state_tensors": len(state),
            "optimizer": type(task.lora.optimizer).__name__, "moved": moved,
            "applied_steps": result["steps"] - result["skipped_steps"], "losses": losses}


def worker_host_syncs(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.train.loop import run
    from llm2clip_scale.train.stage2 import Stage2Task
    from llm2clip_scale.train.task import StepOutput

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", spec["overrides"])
    window, count = spec["window"], spec["count"]
    seen: dict[str, Any] = {"calls": 0, "records": None, "catcher": None, "tensors": 0}

    def start() -> None:
        seen["catcher"] = warnings.catch_warnings(record=True)
        seen["records"] = seen["catcher"].__enter__()
        warnings.simplefilter("always")  # every sync, not one per call site
        if count:
            torch.cuda.set_sync_debug_mode("warn")

    def stop() -> None:
        if count:
            torch.cuda.set_sync_debug_mode("default")
        seen["catcher"].__exit__(None, None, None)
        seen["catcher"] = None

    class Probe(Stage2Task):
        """Stage 2 as the loop runs it; counts from the start of step ``window`` to the start of the next, which
        is one whole loop iteration: the step, the loop's metric all-reduce, logging, and the next batch."""

        def step(self, micro_batches: list[dict]) -> StepOutput:
            seen["calls"] += 1
            if seen["calls"] == window + 1 and seen["catcher"] is not None:
                stop()
            if seen["calls"] == window:
                seen["tensors"] = sum(1 for p in self.engine.module.parameters() if p.requires_grad)
                start()
            return super().step(micro_batches)

    run(cfg, Probe())
    if seen["catcher"] is not None:
        stop()
    syncs = [w for w in seen["records"] or [] if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
    return {"count": len(syncs), "sites": sites.most_common(), "trainable_tensors": seen["tensors"]}


def _short(filename: str) -> str:
    """A call site relative to the repo or to site-packages."""
    for root in (str(REPO) + os.sep, "site-packages" + os.sep):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename
