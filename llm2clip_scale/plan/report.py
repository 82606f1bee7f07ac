"""``llm2clip-scale plan``: the plan as a readable table or one JSON object; exit 0 when it fits, 1 when not."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from llm2clip_scale.config.load import ConfigError, load_config
from llm2clip_scale.plan.estimate import Plan, hints, plan
from llm2clip_scale.plan.hardware import GPUS, gpu_kind


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("plan", help="per-GPU memory, FLOPs, communication and MFU ceiling of a layout; "
                                           "exit 1 when it does not fit")
    sub.add_argument("config", help="YAML file under configs/")
    sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.zero_stage=3")
    sub.add_argument("--nodes", type=int, required=True, help="nodes in the allocation")
    sub.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    sub.add_argument("--gpu", required=True, help=f"GPU kind: {', '.join(GPUS)}")
    sub.add_argument("--caption-tokens", type=int, default=None,
                     help="mean caption tokens for FLOPs and communication (default data.max_text_len; memory "
                          "always assumes max_text_len)")
    sub.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _gib(value: float) -> str:
    return f"{value / 2**30:8.2f} GiB"


def _count(value: float) -> str:
    return f"{value / 1e9:.3f}B" if value >= 1e8 else f"{value / 1e6:.2f}M"


def format_plan(p: Plan) -> str:
    lay = p.layout
    lines = [f"plan: {p.config} on {p.nodes} node(s) x {p.gpus_per_node} {p.gpu} = {lay['world']} GPUs",
             f"  stage {lay['stage']} ({'online' if lay['online'] else 'offline'}), TP {lay['tensor_parallel']} "
             f"PP {lay['pipeline_parallel']} (LLM DP {lay['llm_data_parallel']}), "
             f"{'LoRA AdamW' if lay['stage'] == 'llm2clip_cc' else 'ZeRO-' + str(lay['zero_stage'])}, "
             f"{lay['precision']}, micro-batch {lay['micro_batch']} x {lay['accumulation_steps']} accumulation = "
             f"global {lay['global_batch']}, captions {lay['caption_tokens']} tokens (memory at "
             f"{lay['max_text_len']})",
             "", "parameters: " + ", ".join(f"{k} {_count(v)}" for k, v in p.params.items()),
             "", "memory per GPU (busiest rank: PP stage 0)"]
    width = max(len(k) for k in p.memory) + 2
    lines += [f"  {k:<{width}}{_gib(v)}" for k, v in p.memory.items()]
    lines.append(f"  {'total':<{width}}{_gib(p.total)}  of {_gib(p.capacity).strip()}  "
                 f"({100 * p.total / p.capacity:.0f}%)")
    for k, v in p.memory_alternative.items():
        other = "without" if p.layout.get("grad_checkpointing") else "with"
        lines.append(f"  ({k} {other} checkpointing: {_gib(v).strip()}; total "
                     f"{_gib(p.total - p.memory[k] + v).strip()})")
    lines += ["", "FLOPs per GPU per step"]
    lines += [f"  {k:<{width}}{v / 1e12:12.1f} TFLOP" for k, v in p.flops.items()]
    lines += ["", "communication per GPU per step (sent)"]
    if not p.comm_bytes:
        lines.append("  none")
    lines += [f"  {k:<{width}}{_gib(v)}  {1e3 * p.comm_seconds[k]:9.1f} ms" for k, v in p.comm_bytes.items()]
    lines += ["", f"step time >= {p.compute_seconds + p.exposed_seconds:.3f} s (compute at peak "
                  f"{p.compute_seconds:.3f} s + exposed communication {p.exposed_seconds:.3f} s); "
                  f"MFU ceiling {100 * p.mfu_ceiling:.1f}%",
              "approximate: " + "; ".join(p.approximate)]
    if p.fits:
        lines.append(f"FITS: {_gib(p.total).strip()} of {_gib(p.capacity).strip()}")
    else:
        top = max(p.memory, key=p.memory.__getitem__)
        lines.append(f"DOES NOT FIT: {_gib(p.total).strip()} > {_gib(p.capacity).strip()}; largest term: {top} "
                     f"({_gib(p.memory[top]).strip()})")
        lines += [f"  hint: {h}" for h in hints(p)]
    return "\n".join(lines)


def plan_json(p: Plan) -> dict:
    out = dataclasses.asdict(p)
    out.update(total=p.total, fits=p.fits, hints=[] if p.fits else hints(p))
    return out


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` command: 0 fits, 1 does not fit, 2 bad input."""
    try:
        gpu = gpu_kind(args.gpu)
        cfg = load_config(args.config, args.overrides)
        if args.caption_tokens is not None and args.caption_tokens < 1:
            raise ConfigError(f"--caption-tokens {args.caption_tokens} must be >= 1")
        result = plan(cfg, gpu, args.nodes, args.gpus_per_node, args.caption_tokens, config_name=str(args.config))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(result)) if args.json else format_plan(result))
    return 0 if result.fits else 1
