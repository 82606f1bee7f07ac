"""Per-GPU memory, FLOPs, communication and the MFU ceiling of a config on a GPU layout: the arithmetic of
``llm2clip-scale plan``.

Memory (bytes on the busiest GPU: pipeline stage 0, which holds the LLM's embedding):
- DeepSpeed side (vision tower + adapter + logit scale; ProCLIP stage 1: the adapter), Psi trainable of P held,
  n = world (every rank is a vision replica, ZeRO shards over all of them). bf16: weights 2P (ZeRO-3: 2P/n),
  gradients 2Psi (ZeRO >= 2: /n), fp32 master + Adam m, v 12Psi (ZeRO >= 1: /n) -- DeepSpeed's 2/2/12 -- plus the
  fp32 gradients its optimizer step makes, 4Psi (ZeRO >= 1: /n). fp32: 4P, 4Psi, 8Psi (Adam m, v), no copy.
  Gradient buckets (APPROXIMATE): ZeRO >= 2 two staging buckets of 5e7 elements (engine.py), ZeRO-1 one of 5e8.
- ProCLIP's EMA teacher: an fp32 copy of the vision tower.
- LLM (online only): this rank's frozen shard in the training dtype; a trained LoRA 16 bytes per parameter (fp32
  A and B, their gradients and Adam's m, v: models/llm/lora.py).
- Activations: vision from plan/model.py (exact for the covered blocks); the adapter's; the LLM's no-grad forward
  working set, or under a LoRA the activations of every layer for backward (both APPROXIMATE, plan/model.py).
- Loss buffers (fp32, b = micro_batch rows per rank, B = b x world): infonce the gathered B x d features of both
  sides and their gradients, and b x B logits, log-softmax and gradient per direction; infonce_tiled one tile x B
  block, one gathered side and the gradients; siglip a few b x b blocks and the features in flight.
- RESERVED_BYTES for the CUDA context and library workspaces (an assumption).

Communication per optimizer step, bytes each GPU sends (ring collectives over n ranks: an all-gather or reduce-
scatter of S total bytes sends (n-1)/n S, an all-reduce twice that), timed at the link rate of plan/hardware.py
(InfiniBand when the group spans nodes, else NVLink). Exposed time is all of it except ZeRO >= 2's gradient
reduce-scatter, which DeepSpeed overlaps with backward (overlap_comm). MFU ceiling = model FLOPs / (peak x (hardware
FLOPs / peak + exposed communication)): the compute runs at peak and nothing else is slow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2clip_scale.config.load import ConfigError, layout_problems
from llm2clip_scale.config.schema import Config, trains_offline
from llm2clip_scale.metrics.flops import flop_model, matmul_dtype
from llm2clip_scale.plan import model as shapes
from llm2clip_scale.plan.hardware import RESERVED_BYTES, GPUKind

_STAGE2_BUCKET, _STAGE1_BUCKET = 50_000_000, 500_000_000


@dataclass
class Plan:
    config: str
    gpu: str
    nodes: int
    gpus_per_node: int
    layout: dict[str, int | str]
    params: dict[str, int]
    memory: dict[str, float]  # bytes per GPU by term (the total is their sum)
    memory_alternative: dict[str, float]  # vision activations with the other checkpointing setting
    capacity: float
    flops: dict[str, float]  # per GPU per step
    comm_bytes: dict[str, float]  # sent per GPU per step
    comm_seconds: dict[str, float]
    exposed_seconds: float
    compute_seconds: float
    mfu_ceiling: float
    approximate: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def check_layout(cfg: Config, nodes: int, gpus_per_node: int) -> None:
    """The layout rules a plan needs (validate() also checks files, which a laptop planning a cluster lacks)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1")
    problems = layout_problems(cfg, nodes * gpus_per_node)
    if problems:
        raise ConfigError(f"cannot plan this layout ({nodes} node(s) x {gpus_per_node} GPUs):\n  - "
                          + "\n  - ".join(problems))


def _ring(total: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather / reduce-scatter of ``total`` bytes over ``n`` ranks."""
    return (n - 1) / n * total if n > 1 else 0.0


def _deepspeed_memory(psi: int, held: int, n: int, zero: int, bf16: bool) -> dict[str, float]:
    weight = 2 if bf16 else 4
    out = {
        "weights": weight * held / (n if zero >= 3 else 1),
        "gradients": weight * psi / (n if zero >= 2 else 1),
        "optimizer states": (12 if bf16 else 8) * psi / (n if zero >= 1 else 1),
    }
    if bf16:
        out["fp32 gradients (step)"] = 4 * psi / (n if zero >= 1 else 1)
    if zero >= 1:
        bucket = min(_STAGE2_BUCKET if zero >= 2 else _STAGE1_BUCKET, psi)
        out["ZeRO buckets"] = (2 if zero >= 2 else 1) * bucket * weight
    return out


def _loss_memory(cfg: Config, world: int, dim: int) -> float:
    b, loss = cfg.train.micro_batch, cfg.train.loss
    big = b * world
    if loss == "infonce":
        return 4.0 * (2 * 2 * big * dim + 2 * 3 * b * big)
    if loss == "infonce_tiled":
        tile = min(cfg.train.loss_tile_size, b)
        return 4.0 * (tile * big + big * dim + 2 * (b * dim + big * dim))
    return 4.0 * (4 * b * b + 4 * b * dim)  # siglip: blocks of one ring hop, local and travelling features


@dataclass(frozen=True)
class _Run:
    """The layout numbers every term needs."""

    world: int
    tp: int
    pp: int
    zero: int
    bf16: bool
    micro: int
    accum: int  # micro-steps per optimizer step
    replicas: int  # data-parallel replicas the global batch is split over
    seq: int  # data.max_text_len: memory assumes every caption this long
    tokens: int  # mean caption tokens for FLOPs and communication
    stage1: bool
    online: bool
    lora: bool  # a trained LLM LoRA (stage 1, or stage 2 with model.llm.lora_rank)
    texts: int  # captions per sample through the LLM (stage 1: query, positive, hard negative)

    @property
    def act(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def llm_rows(self) -> int:
        """Captions one LLM pass embeds: a TP group (under PP, the whole TP x PP group) embeds the union of its ranks'
        captions (models/llm/embed.py: embed_local_batch)."""
        return self.micro * self.texts if self.stage1 else self.tp * self.pp * self.micro * self.texts


def _run(cfg: Config, world: int, caption_tokens: int | None) -> _Run:
    par, train = cfg.parallel, cfg.train
    stage1 = train.stage == "llm2clip_cc"
    online = stage1 or not trains_offline(cfg.data)
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    replicas = world // (tp * pp) if stage1 else world
    texts = ((3 if cfg.stage1.hard_negatives else 2) if stage1
             else max(1, len(cfg.proclip.views)) if train.stage == "proclip_inherit" else 1)
    return _Run(world, tp, pp, par.zero_stage, train.precision == "bf16", train.micro_batch,
                train.global_batch // (train.micro_batch * replicas), replicas, cfg.data.max_text_len,
                caption_tokens or cfg.data.max_text_len, stage1, online,
                stage1 or (train.stage == "stage2" and online and cfg.model.llm.lora_rank > 0), texts)


def _memory(cfg: Config, run: _Run, params: dict[str, int], approximate: list[str]
            ) -> tuple[dict[str, float], dict[str, float]]:
    """(bytes per GPU by term, the vision activations with the other checkpointing setting); fills ``params``."""
    stage, llm, b, act = cfg.train.stage, cfg.model.llm, run.micro, run.act
    memory: dict[str, float] = {}
    alternative: dict[str, float] = {}
    psi = held = 0
    if not run.stage1:  # stage 1 trains the LLM's LoRA only, outside DeepSpeed
        params["adapter"] = shapes.adapter_params(cfg.model.adapter, cfg.model.embed_dim)
        scalars = (1 if cfg.model.logit_bias_init is None else 2) if stage != "proclip_inherit" else 0
        psi = held = params["adapter"] + scalars
    if stage == "stage2":
        vision = shapes.vision_shape(cfg)
        params.update(vision=vision.params, vision_trainable=vision.trainable)
        psi, held = psi + vision.trainable, held + vision.params
        if not vision.exact:
            approximate.append(f"vision activations (no rule for {', '.join(vision.unknown)})")
    if psi:
        params["deepspeed_trainable"], params["deepspeed_held"] = psi, held
        terms = _deepspeed_memory(psi, held, run.world, run.zero, run.bf16)
        memory.update({f"{k} (DeepSpeed)": v for k, v in terms.items()})
    if stage == "stage2" and cfg.train.self_distill_weight > 0:
        memory["EMA teacher (fp32)"] = 4.0 * params["vision"]
    if run.online:
        params["llm_total"] = shapes.llm_shard_params(llm, 1, 1, 0)
        params["llm_shard"] = shapes.llm_shard_params(llm, run.tp, run.pp, 0)
        memory["LLM shard (frozen)"] = act * params["llm_shard"]
        if run.lora:
            params["llm_lora"] = shapes.llm_lora_params(llm, run.tp, run.pp)
            memory["LLM LoRA (weights, grads, Adam)"] = 16.0 * params["llm_lora"]
    if stage == "stage2":
        ckpt = cfg.model.vision.grad_checkpointing
        memory["activations: vision"] = shapes.vision_activation_bytes(vision, b, act, ckpt)[1]
        alternative["activations: vision"] = shapes.vision_activation_bytes(vision, b, act, not ckpt)[1]
    if not run.stage1:
        elements, fp32 = shapes.adapter_activation_elements(cfg.model.adapter)
        memory["activations: adapter"] = b * (elements * act + fp32 * 4)
    if run.online:
        tokens = run.llm_rows * run.seq
        if run.lora:
            per_token = shapes.llm_training_bytes_per_token(llm, run.tp, run.seq, act)
            memory["activations: LLM (LoRA backward)"] = llm.num_layers // run.pp * tokens * per_token
        else:
            per_token = shapes.llm_inference_bytes_per_token(llm, run.tp, act)
            memory["activations: LLM (no-grad forward)"] = tokens * per_token
    if run.stage1:  # SimCSE over the replica's pairs: cached embeddings, their gradients, the logits
        rows = cfg.train.global_batch // run.replicas
        memory["loss buffers"] = 4.0 * (2 * rows * run.texts * llm.hidden_size + 3 * rows * rows * (run.texts - 1))
    elif stage == "proclip_inherit":
        memory["loss buffers"] = 4.0 * (4 * b * b + 4 * b * cfg.model.embed_dim)
    else:
        memory["loss buffers"] = _loss_memory(cfg, run.world, cfg.model.embed_dim)
    memory["reserved"] = float(RESERVED_BYTES)
    return memory, alternative


def _communication(cfg: Config, run: _Run, params: dict[str, int]) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, by collective."""
    comm: dict[str, float] = {}
    world, b, accum, llm = run.world, run.micro, run.accum, cfg.model.llm
    if cfg.train.stage == "stage2" and world > 1:
        dim = cfg.model.embed_dim
        if cfg.train.loss == "siglip":  # text block around the ring: forward and its gradient back
            comm["feature exchange (siglip ring)"] = accum * 2 * (world - 1) * b * dim * 4.0
        else:  # all-gather of image and text features, their reduce-scatters in backward (fp32)
            comm["feature gathers"] = accum * 4 * _ring(world * b * dim * 4.0, world)
    psi, held = params.get("deepspeed_trainable", 0), params.get("deepspeed_held", 0)
    if psi and world > 1:  # gradients travel in fp32 (engine.py: communication_data_type), parameters as held
        if run.zero == 0:
            comm["ZeRO-0 gradient all-reduce"] = 2 * _ring(psi * 4.0, world)
        elif run.zero in (1, 2):
            rounds = accum if run.zero == 2 else 1  # ZeRO-2 reduces every micro-step into its shard
            comm[f"ZeRO-{run.zero} gradient reduce-scatter"] = rounds * _ring(psi * 4.0, world)
            comm[f"ZeRO-{run.zero} parameter all-gather"] = _ring(psi * run.act, world)
        else:
            comm["ZeRO-3 parameter all-gathers (fwd+bwd)"] = accum * 2 * _ring(held * run.act, world)
            comm["ZeRO-3 gradient reduce-scatter"] = accum * _ring(psi * 4.0, world)
    if run.online:
        step_tokens = run.llm_rows * run.tokens
        passes = 3 if run.lora else 1  # LoRA: gradient caching's no-grad pass, the replayed forward, its backward
        if run.tp > 1:
            per_pass = (2 * llm.num_layers // run.pp + 1) * 2 * _ring(step_tokens * llm.hidden_size * run.act, run.tp)
            comm["TP all-reduces (LLM)"] = accum * passes * per_pass
        if run.pp > 1:
            comm["PP activations (LLM)"] = accum * passes * step_tokens * llm.hidden_size * run.act
        dp = world // (run.tp * run.pp)
        if run.lora and dp > 1:
            comm["LoRA gradient all-reduce"] = 2 * _ring(params["llm_lora"] * 4.0, dp)
    return comm


def plan(cfg: Config, gpu: GPUKind, nodes: int, gpus_per_node: int, caption_tokens: int | None = None,
         config_name: str = "") -> Plan:
    """The plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu``; captions are ``caption_tokens``
    long for FLOPs and communication (default data.max_text_len) and always max_text_len for memory."""
    check_layout(cfg, nodes, gpus_per_node)
    train = cfg.train
    run = _run(cfg, nodes * gpus_per_node, caption_tokens)
    layout: dict[str, int | str] = {
        "stage": train.stage, "world": run.world, "tensor_parallel": run.tp, "pipeline_parallel": run.pp,
        "llm_data_parallel": run.world // (run.tp * run.pp), "zero_stage": run.zero, "precision": train.precision,
        "micro_batch": run.micro, "global_batch": train.global_batch, "accumulation_steps": run.accum,
        "online": int(run.online), "caption_tokens": run.tokens, "max_text_len": run.seq}
    if train.stage == "stage2":
        layout["grad_checkpointing"] = int(cfg.model.vision.grad_checkpointing)
    approximate = ["gradient buckets", *(["LLM activations"] if run.online else []), "loss buffers",
                   f"reserved {RESERVED_BYTES / 2**30:.0f} GiB (CUDA context, NCCL/cuBLAS workspaces)",
                   "link rates (plan/hardware.py)"]
    if train.stage == "proclip_inherit":
        approximate.append("the CLIP text teacher is not counted")
    params: dict[str, int] = {}
    memory, alternative = _memory(cfg, run, params, approximate)

    per_sample = flop_model(cfg).per_sample(run.tokens if run.online else None)
    samples = train.global_batch / run.world
    flops = {"model": per_sample["model"] * samples, "hardware": per_sample["hardware"] * samples}
    flops.update({f"model: {k}": per_sample[k] * samples for k in ("vision", "adapter", "teacher", "llm")
                  if per_sample.get(k)})

    def rate(group: int) -> float:
        """Bytes/s of a group of consecutive ranks (TP, TP x PP) or of one spanning the world (DP, LoRA DP)."""
        return (gpu.nvlink_gbps if group <= gpus_per_node else gpu.network_gbps) * 1e9

    comm = _communication(cfg, run, params)
    seconds: dict[str, float] = {}
    exposed = 0.0
    for name, volume in comm.items():
        group = run.tp if name.startswith("TP") else run.tp * run.pp if name.startswith("PP") else run.world
        seconds[name] = volume / rate(group)
        if not (run.zero >= 2 and name.endswith("gradient reduce-scatter")):  # overlapped with backward (overlap_comm)
            exposed += seconds[name]
    peak = gpu.peak_tflops(matmul_dtype(train.precision)) * 1e12
    compute = flops["hardware"] / peak
    mfu = flops["model"] / (peak * (compute + exposed)) if compute + exposed > 0 else 0.0
    return Plan(config_name, gpu.name, nodes, gpus_per_node, layout, params, memory, alternative,
                float(gpu.memory_bytes), flops, comm, seconds, exposed, compute, mfu, approximate)


def hints(p: Plan) -> list[str]:
    """What to change when ``p`` does not fit, for its largest terms."""
    out: list[str] = []
    mem, layout = p.memory, p.layout
    deepspeed = sum(v for k, v in mem.items() if k.endswith("(DeepSpeed)"))
    if deepspeed > 0.25 * p.capacity:
        if int(layout["world"]) == 1:
            out.append("add GPUs (--nodes, --gpus-per-node) and raise parallel.zero_stage: ZeRO shards the "
                       "DeepSpeed terms over the GPUs, and one GPU has nothing to shard over")
        elif int(layout["zero_stage"]) < 3:
            out.append(f"raise parallel.zero_stage (now {layout['zero_stage']}): it shards the DeepSpeed terms over "
                       f"{layout['world']} GPUs")
    if mem.get("activations: vision", 0) > 0.2 * p.capacity and not layout.get("grad_checkpointing", 1):
        out.append("enable model.vision.grad_checkpointing=true (keeps one tensor per block)")
    activations = sum(v for k, v in mem.items() if k.startswith("activations") or k == "loss buffers")
    if activations > 0.2 * p.capacity:
        out.append(f"lower train.micro_batch (now {layout['micro_batch']}; global_batch stays, accumulation grows)")
    if mem.get("loss buffers", 0) > 0.1 * p.capacity and layout["stage"] == "stage2":
        out.append("train.loss=infonce_tiled keeps one tile x B block instead of the b x B logits")
    if mem.get("LLM shard (frozen)", 0) > 0.2 * p.capacity:
        out.append(f"add tensor parallelism (parallel.tensor_parallel, now {layout['tensor_parallel']}) to split "
                   "the LLM shard")
    return out or ["use GPUs with more memory, or more of them (ZeRO shards over all of them)"]
