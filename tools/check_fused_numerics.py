"""Compare what training runs, slot by slot, with its torch reference on random inputs; exit 1 if any row fails.

    python tools/check_fused_numerics.py [--seed 0] [--steps 10]

Every slot of the kernel registry (``llm2clip-scale env``) is built through the builder training uses and compared
with the reference, in fp32 and bf16, on the GPU when there is one (else the CPU):

- ``attention``: the vision tower as ``build_vision_tower`` builds it (timm calling F.scaled_dot_product_attention,
  or not, as the registry says) against the same tower with timm's unfused attention, for each vision family the
  configs train (ViT, EVA02 as in ViT-E, SigLIP with its attention pool) at the configs' head widths: pooled output,
  d(images) and d(parameters).
- ``rmsnorm``: the norm class of the LLM tower's local layer spec (``RegistryRMSNorm``), ``layernorm``: the adapter's
  ``build_layernorm``, each against torch's module: forward, d(input), d(weight, bias).
- ``adamw``: ``build_optimizer`` against the torch AdamW loop: 10-step parameter trajectories.

A slot whose choice is the reference here is compared with itself (marked ``self-check``), which keeps the script
exercised. ``megatron_layer_spec`` is a whole-model choice: Transformer Engine's layers against the local spec are
compared by ``tools/first_gpu_check.sh --only te_vs_local``, and the local spec's norms are the ``rmsnorm`` rows.

Errors are reported as max |test - reference| and that maximum divided by max |reference| ("rel", robust to
near-zero elements); a row passes when rel <= its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from torch import nn

from llm2clip_scale.config.schema import VisionConfig
from llm2clip_scale.kernels import KernelChoice, build_layernorm, build_optimizer, build_rmsnorm, resolve_all

# Tolerances on rel error. bf16 has an 8-bit mantissa (ulp 2^-8 ~ 4e-3 at 1.0): fused and reference kernels round
# at different points, so a few ulps apart is expected; fp32 differences come from summation order only. In bf16
# timm's unfused reference computes the softmax in bf16 itself, so fused attention is compared to a reference that
# is ~1e-2 off the exact value (measured: towers of two blocks, 0.3-1.6e-2).
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"forward": 1e-5, "backward": 1e-4, "attention": 1e-5, "trajectory": 1e-5},
    torch.bfloat16: {"forward": 2e-2, "backward": 5e-2, "attention": 3e-2, "trajectory": 1e-2},
}
DTYPES = (torch.float32, torch.bfloat16)
COMPARED = ("layernorm", "rmsnorm", "attention", "adamw")  # megatron_layer_spec: see the module docstring
NORM_DIM = 1024

# The vision families the configs train, shrunk to two blocks and a small width at the real head width, so that
# the same timm attention modules dispatch to the same SDPA kernels: (timm name, image size on a GPU, kwargs).
TOWERS: dict[str, tuple[str, int, dict]] = {
    "vit_tiny": ("vit_tiny_patch16_224", 64, {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}),
    "vit_l14": ("vit_large_patch14_clip_224", 224, {"depth": 2, "embed_dim": 128, "num_heads": 2}),  # head 64
    "eva02_e": ("eva02_enormous_patch14_clip_224", 224, {"depth": 2, "embed_dim": 224, "num_heads": 2}),  # 112, RoPE
    "so400m": ("vit_so400m_patch14_siglip_384", 384, {"depth": 2, "embed_dim": 144, "num_heads": 2}),  # 72, pool
}
CPU_PATCHES = 4  # on the CPU each image is 4x4 patches: the same code paths, seconds instead of minutes


@dataclass(frozen=True)
class Row:
    slot: str
    impl: str
    dtype: str
    quantity: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tol  # NaN compares False, so a NaN fails


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got.detach().float() - want.detach().float()).abs().max().item()
    scale = want.detach().float().abs().max().item()
    return diff, diff / max(scale, torch.finfo(torch.float32).tiny)


def _row(slot: str, impl: str, dtype: torch.dtype, quantity: str, got: torch.Tensor, want: torch.Tensor,
         tol: float) -> Row:
    return Row(slot, impl, str(dtype).removeprefix("torch."), quantity, *errors(got, want), tol)


def compare_norm(slot: str, impl: str, build_test: Callable[[], nn.Module], build_ref: Callable[[], nn.Module],
                 device: torch.device, dtype: torch.dtype, seed: int = 0, dim: int = NORM_DIM) -> list[Row]:
    """Forward, d(input) and d(parameters) of two norm modules given the same affine parameters and inputs."""
    gen = torch.Generator().manual_seed(seed)
    modules = [build_test().to(device, dtype), build_ref().to(device, dtype)]
    names = [n for n, _ in build_ref().named_parameters()]  # weight (and bias for LayerNorm)
    values = {n: 1.0 + 0.5 * torch.randn(dim, generator=gen) for n in names}
    x = (2.0 * torch.randn(8, 64, dim, generator=gen) + 0.5).to(device, dtype)  # off-centre: exercises the mean
    grad = torch.randn(8, 64, dim, generator=gen).to(device, dtype)
    results = []
    for module in modules:
        with torch.no_grad():
            for n in names:
                getattr(module, n).copy_(values[n])
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(grad)
        results.append((out, xi.grad, [getattr(module, n).grad for n in names]))
    (out_t, dx_t, dp_t), (out_r, dx_r, dp_r) = results
    tol = TOLERANCES[dtype]
    rows = [_row(slot, impl, dtype, "forward", out_t, out_r, tol["forward"]),
            _row(slot, impl, dtype, "backward d_input", dx_t, dx_r, tol["backward"])]
    rows += [_row(slot, impl, dtype, f"backward d_{n}", a, b, tol["backward"]) for n, a, b in zip(names, dp_t, dp_r)]
    return rows


def timm_reference(tower: nn.Module) -> nn.Module:
    """A copy of ``tower`` (same weights) in which every timm attention module takes its unfused path."""
    from llm2clip_scale.models.vision.timm_tower import attention_modules

    reference = copy.deepcopy(tower)
    for name in attention_modules(reference):
        reference.get_submodule(name).fused_attn = False
    return reference


def compare_tower_attention(impl: str, tower: nn.Module, reference: nn.Module, image_size: int, device: torch.device,
                            dtype: torch.dtype, seed: int = 0) -> list[Row]:
    """Pooled embedding, d(images) and d(all parameters) of two vision towers with equal weights."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image_size, image_size, generator=gen).to(device, dtype)
    results = []
    for module in (tower, reference):
        module.train()
        x = images.clone().requires_grad_(True)
        out = module(x)
        out.float().square().sum().backward()  # a loss in fp32, as training's
        grads = torch.cat([p.grad.float().flatten() for p in module.parameters() if p.grad is not None])
        results.append((out, x.grad, grads))
    tol = TOLERANCES[dtype]  # gradients sum over tokens and images, in each kernel's own order: the backward column
    return [_row("attention", impl, dtype, quantity, a, r, tol["attention" if quantity == "forward" else "backward"])
            for quantity, a, r in zip(("forward", "backward d_images", "backward d_params"), *results)]


OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def _trajectory(make: OptimizerFactory, start: list[torch.Tensor], grads: list[list[torch.Tensor]],
                dtype: torch.dtype) -> torch.Tensor:
    params = [nn.Parameter(p.clone().to(dtype)) for p in start]
    optimizer = make(params)
    trajectory = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        optimizer.step()
        trajectory.append(torch.cat([p.detach().float().flatten() for p in params]))
    return torch.stack(trajectory)


def compare_adamw(impl: str, make_test: OptimizerFactory, make_ref: OptimizerFactory, device: torch.device,
                  dtype: torch.dtype, steps: int = 10, seed: int = 0) -> list[Row]:
    """Parameter trajectories of two AdamWs fed the same gradients; the worst step is reported.

    With bf16 parameters an update (lr 1e-2 on weights ~0.1) is only a few ulps, and where each implementation rounds
    moves trajectories apart by about as much as bf16 itself costs the reference against an fp32 run; so the bf16
    tolerance is twice the reference's own bf16-vs-fp32 error (at least the table's floor): a real bug (no bias
    correction, coupled weight decay) moves the trajectory far more.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(256, 128), (128,), (1000,)]
    start = [(0.1 * torch.randn(shape, generator=gen)).to(device) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen).to(device) for shape in shapes] for _ in range(steps)]
    test, ref = (_trajectory(make, start, grads, dtype) for make in (make_test, make_ref))
    tol = TOLERANCES[dtype]["trajectory"]
    if dtype != torch.float32:
        tol = max(tol, 2 * errors(ref, _trajectory(make_ref, start, grads, torch.float32))[1])
    return [_row("adamw", impl, dtype, f"params over {steps} steps", test, ref, tol)]


def _adamw(force_reference: bool | None) -> OptimizerFactory:
    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_optimizer(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                               force_reference=force_reference)

    return make


def llm_rmsnorm(dim: int, dtype: torch.dtype) -> nn.Module:
    """The RMSNorm the LLM tower's local layer spec builds (its input norm class, as megatron calls it)."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from llm2clip_scale.models.llm.tower import _layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=dim, num_attention_heads=8, normalization="RMSNorm",
                               params_dtype=dtype)
    spec = _layer_spec("local", bidirectional=True)
    return build_module(spec.submodules.input_layernorm, config=config, hidden_size=dim, eps=1e-5)


def vision_tower(key: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, int]:
    """``TOWERS[key]`` built by training's builder on ``device`` in ``dtype``; returns (tower, image size)."""
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    name, image_size, kwargs = TOWERS[key]
    if device.type == "cpu":
        image_size = CPU_PATCHES * kwargs.get("patch_size", 14 if "patch14" in name else 16)
    torch.manual_seed(seed)
    cfg = VisionConfig(name=name, image_size=image_size, timm_kwargs=kwargs)
    return build_vision_tower(cfg, embed_dim=64, device=device, dtype=dtype), image_size


def _label(choice: KernelChoice) -> str:
    return choice.name if choice.fused else f"{choice.name} (self-check)"


def run_checks(device: torch.device, choices: dict[str, KernelChoice], steps: int = 10, seed: int = 0,
               towers: tuple[str, ...] | None = None) -> list[Row]:
    """Each compared slot as training builds it (``choices`` are what the registry resolves here) against the
    reference, in fp32 and bf16; ``towers``: keys of TOWERS (default all)."""
    from llm2clip_scale.models.vision.timm_tower import attention_modules

    towers = tuple(TOWERS) if towers is None else towers
    rows: list[Row] = []
    for slot in COMPARED:
        impl = _label(choices[slot])
        for dtype in DTYPES:
            if slot == "layernorm":  # the adapter's call: build_layernorm(dim)
                rows += compare_norm(slot, impl, lambda: build_layernorm(NORM_DIM),
                                     lambda: build_layernorm(NORM_DIM, force_reference=True), device, dtype, seed)
            elif slot == "rmsnorm":
                rows += compare_norm(slot, impl, lambda d=dtype: llm_rmsnorm(NORM_DIM, d),
                                     lambda: build_rmsnorm(NORM_DIM, eps=1e-5, force_reference=True), device, dtype,
                                     seed)
            elif slot == "attention":
                for key in towers:
                    tower, size = vision_tower(key, device, dtype, seed)
                    fused = sum(attention_modules(tower).values())
                    label = f"{_label(choices[slot])} {key}" if fused else f"timm.explicit {key} (self-check)"
                    rows += compare_tower_attention(label, tower, timm_reference(tower), size, device, dtype, seed)
            else:
                rows += compare_adamw(impl, _adamw(None), _adamw(True), device, dtype, steps, seed)
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max([len(r.impl) for r in rows] + [20])
    header = (f"{'slot':<10} {'impl':<{width}} {'dtype':<9} {'quantity':<32} {'max_abs':>10} {'rel':>10} {'tol':>8}  "
              f"result")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.slot:<10} {r.impl:<{width}} {r.dtype:<9} {r.quantity:<32} {r.max_abs:>10.3e} "
                     f"{r.max_rel:>10.3e} {r.tol:>8.1e}  {'PASS' if r.passed else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="AdamW steps per trajectory")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    command = " ".join(["python tools/check_fused_numerics.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"check_fused_numerics on {device.type} ({where}), torch {torch.__version__}, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {command}")
    choices = resolve_all()
    for choice in choices.values():
        print(f"{choice.slot:<20} {choice.name:<20} {'fused' if choice.fused else 'reference'}: {choice.reason}")
    spec = choices["megatron_layer_spec"]
    print(f"megatron_layer_spec: {spec.name} — a whole-model choice, compared by tools/first_gpu_check.sh --only "
          "te_vs_local; the local spec's norms are the rmsnorm rows below")
    self_checked = [slot for slot in COMPARED if not choices[slot].fused]
    if len(self_checked) == len(COMPARED):
        print("fused path unavailable (see the reasons above); running the reference-vs-reference self-check")
    elif self_checked:
        print(f"reference here (compared with itself): {', '.join(self_checked)}")
    rows = run_checks(device, choices, steps=args.steps, seed=args.seed)
    print(format_rows(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} passed" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
