"""The DeepSpeed side of a checkpoint (vision tower, adapter, logit scale) as plain tensors, and the timm folder.

Consolidation runs in one process from the files alone, for any world size and ZeRO stage:

- ZeRO 1/2 keep every parameter whole in ``mp_rank_00_model_states.pt`` (in the training dtype) and the fp32
  masters of the trainable ones partitioned in ``*_optim_states.pt``; DeepSpeed's own
  ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` reassembles the masters, laid over the module state so
  that frozen parameters (a locked trunk) are kept too.
- ZeRO-3 partitions the parameters themselves; ``zero_to_fp32`` reassembles trainable and frozen ones.
- ZeRO-0 (fp32) has no partitions: the module state is the model.

The stage-2 tower is a timm trunk built with ``num_classes=0`` plus a fresh ``head`` Linear; a stock timm model of
the same name built with ``num_classes=embed_dim`` pools the same way and puts exactly that Linear in its classifier,
so ``timm_model(images)`` is the tower's unnormalised image embedding. A vision LoRA is folded into its linears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from llm2clip_scale.config.schema import Config, VisionConfig
from llm2clip_scale.export.source import ENGINE_TAG, ExportError

log = logging.getLogger("llm2clip_scale.export")


def consolidate_engine_state(step_dir: Path, zero_stage: int) -> dict[str, Tensor]:
    """The full fp32 state dict of the DeepSpeed-wrapped module (CLIPWithAdapter, or ProCLIP's adapter student)."""
    ds_dir = step_dir / ENGINE_TAG
    state: dict[str, Tensor] = {}
    if zero_stage <= 2:
        module_file = ds_dir / "mp_rank_00_model_states.pt"
        if not module_file.is_file():
            raise ExportError(f"{module_file}: missing; the DeepSpeed checkpoint is incomplete")
        saved = torch.load(module_file, map_location="cpu", weights_only=False, mmap=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
        del saved
    partitions = list(ds_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_stage >= 1 or partitions:  # ZeRO-0 has partitions only under DeepSpeed's bf16 optimizer
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            # It prints progress; stdout is for the converter's result.
            with contextlib.redirect_stdout(sys.stderr), _param_shapes_as_torch_size():
                state.update(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=ENGINE_TAG))
        except (FileNotFoundError, ValueError, KeyError) as err:
            if zero_stage >= 1:
                raise ExportError(f"{ds_dir}: DeepSpeed could not consolidate the ZeRO-{zero_stage} partitions "
                                  f"({err}); the checkpoint is incomplete") from None
            log.warning("%s: no fp32 masters readable (%s); exporting the module weights as saved", ds_dir, err)
    if not state:
        raise ExportError(f"{ds_dir}: no parameters found in the DeepSpeed checkpoint")
    empty = sorted(name for name, value in state.items() if value.numel() == 0)
    if empty:
        raise ExportError(f"{ds_dir}: parameters {empty[:3]} could not be reassembled (empty after consolidation)")
    return state


@contextlib.contextmanager
def _param_shapes_as_torch_size() -> Iterator[None]:
    """Let zero_to_fp32 read checkpoints whose recorded parameter shapes are plain tuples.

    llm2clip_scale's background checkpoint writer (checkpoint/writer.py ``cpu_snapshot``) rebuilds every tuple it
    copies, so DeepSpeed's ``param_shapes`` / ``frozen_param_shapes`` (torch.Size) reach the file as tuples, and
    zero_to_fp32's ZeRO-3 path calls ``shape.numel()`` on them. Existing checkpoints must export too, so the shapes
    are turned back into torch.Size after DeepSpeed parses the files; nothing else about its reading changes.
    """
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.parse_model_states

    def parse_model_states(files: list[str]) -> list:
        states = original(files)
        for state in states:
            for group in state.param_shapes:
                for name, shape in list(group.items()):
                    group[name] = torch.Size(shape)
            for name, shape in list((state.frozen_param_shapes or {}).items()):
                state.frozen_param_shapes[name] = torch.Size(shape)
        return states

    zero_to_fp32.parse_model_states = parse_model_states
    try:
        yield
    finally:
        zero_to_fp32.parse_model_states = original


def split_engine_state(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{"vision": tower state, "adapter": adapter state, "scalars": logit_scale / logit_bias} by module prefix."""
    parts: dict[str, dict[str, Tensor]] = {"vision": {}, "adapter": {}, "scalars": {}}
    for name, value in state.items():
        head, _, rest = name.partition(".")
        if head in ("vision", "adapter") and rest:
            parts[head][rest] = value
        elif name in ("logit_scale", "logit_bias"):
            parts["scalars"][name] = value
        else:
            raise ExportError(f"engine state holds {name!r}, which is neither vision tower, adapter nor logit scale")
    return parts


def merge_vision_lora(tower_state: dict[str, Tensor], vision: VisionConfig) -> tuple[dict[str, Tensor], int]:
    """Fold each ``LoRALinear`` (base.weight + alpha/r * lora_B @ lora_A) into plain Linear keys; (state, count)."""
    prefixes = {name[: -len(".lora_A")] for name in tower_state if name.endswith(".lora_A")}
    if prefixes and vision.lora_rank <= 0:
        raise ExportError("vision state holds LoRA matrices but model.vision.lora_rank is 0; the config does not "
                          "belong to this checkpoint")
    scaling = vision.lora_alpha / vision.lora_rank if prefixes else 0.0
    consumed = {f"{p}.{suffix}" for p in prefixes for suffix in ("lora_A", "lora_B", "base.weight", "base.bias")}
    merged = {name: value for name, value in tower_state.items() if name not in consumed}
    for prefix in sorted(prefixes):
        try:
            base, a, b = (tower_state[f"{prefix}.{k}"].float() for k in ("base.weight", "lora_A", "lora_B"))
        except KeyError as err:
            raise ExportError(f"vision state: LoRA linear {prefix} lacks {err}") from None
        merged[f"{prefix}.weight"] = base + scaling * (b @ a)
        if f"{prefix}.base.bias" in tower_state:
            merged[f"{prefix}.bias"] = tower_state[f"{prefix}.base.bias"]
    return merged, len(prefixes)


def timm_model_args(vision: VisionConfig) -> dict:
    """The timm constructor arguments of the trunk (as models/vision/timm_tower.py builds it), minus training-only
    ones (patch dropout) and the class count, which the export sets."""
    args = {"img_size": vision.image_size, **vision.timm_kwargs}
    for key in ("num_classes", "patch_drop_rate"):
        args.pop(key, None)
    return args


def build_timm_classifier(vision: VisionConfig, embed_dim: int, tower_state: dict[str, Tensor]) -> nn.Module:
    """A stock timm model holding the tower: trunk weights as they are, the tower's head as timm's classifier."""
    import timm

    args = timm_model_args(vision)
    with torch.device("meta"):  # no random init of weights that are overwritten next (minutes for ViT-E)
        model = timm.create_model(vision.name, pretrained=False, num_classes=embed_dim, **args)
    classifier = model.get_classifier()
    names = [name for name, module in model.named_modules() if module is classifier]
    if not names or not isinstance(classifier, nn.Linear):
        raise ExportError(f"timm {vision.name}: its classifier is not one Linear ({type(classifier).__name__}); this "
                          "tower cannot be exported as a timm classifier")
    state = {}
    for name, value in tower_state.items():
        if name.startswith("trunk."):
            state[name[len("trunk."):]] = value
        elif name.startswith("head."):
            state[f"{names[0]}.{name[len('head.'):]}"] = value
        else:
            raise ExportError(f"vision state: {name!r} is neither trunk nor head")
    model = model.to_empty(device="cpu")
    from timm.models._manipulate import reinit_non_persistent_buffers

    reinit_non_persistent_buffers(model)  # RoPE tables and similar are not in state dicts
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"timm {vision.name} with {args} does not take the tower's weights: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}; the trunk was not built from this timm name")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def image_data_config(cfg: Config) -> dict:
    """The eval transform of training (data/samples.py: bicubic resize of the short side to image_size, centre crop,
    normalise) in timm's data-config terms."""
    size = cfg.model.vision.image_size
    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": tuple(cfg.data.image_mean), "std": tuple(cfg.data.image_std)}


def write_timm_folder(model: nn.Module, vision: VisionConfig, cfg: Config, out_dir: Path, dtype: torch.dtype,
                      tag: str) -> dict[str, Tensor]:
    """timm's own ``save_for_hf`` (config.json + model.safetensors); returns the saved state (for fingerprints)."""
    from timm.models import save_for_hf

    model = model.to(dtype)
    save_for_hf(model, str(out_dir), safe_serialization=True, model_args=timm_model_args(vision),
                data_config=image_data_config(cfg))
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    pretrained = config["pretrained_cfg"]
    # The source tag and licence of timm's registry entry describe ImageNet weights, not these.
    for key in ("license", "hf_hub_id", "url", "paper_ids", "notes"):
        pretrained.pop(key, None)
    pretrained["tag"] = tag
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return {k: v.detach() for k, v in model.state_dict().items()}


def preprocessor_config(cfg: Config) -> dict:
    """preprocessor_config.json for transformers' CLIPImageProcessor: the same resize, crop and normalisation."""
    size = cfg.model.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL.Image.BICUBIC, as torchvision's Resize(interpolation=BICUBIC) in training
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.data.image_mean),
        "image_std": list(cfg.data.image_std),
    }
