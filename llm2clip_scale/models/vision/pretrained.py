"""Load pretrained vision-trunk weights from local files (no hub access) in timm, open_clip or OpenAI CLIP layout.

The key maps themselves are timm's: each timm model family ships a ``checkpoint_filter_fn`` that already knows the
OpenAI (``visual.conv1``/``transformer.resblocks``) and open_clip (``visual.trunk.``) layouts, so this module only
unwraps containers, strips wrapper prefixes, drops the text tower and original projection, and then checks the
result strictly against the trunk — a silently half-loaded tower would train fine and just be worse.
"""

from __future__ import annotations

import importlib
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Wrapper prefixes added by DDP/DeepSpeed (``module.``) and torch.compile (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Containers that training scripts nest the weights under (open_clip: ``state_dict``; timm/DeiT: ``model``).
_CONTAINER_KEYS = ("state_dict", "model", "module")
# Keys in the trunk's key space that belong to the original classifier/projection, which LLM2CLIP re-initialises.
_HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.")


@dataclass
class LoadReport:
    """What a pretrained load did. ``expected_missing`` are the freshly initialised tower-head keys."""

    path: str
    format: str  # timm | open_clip | openai
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # original head/projection and text-tower keys, on purpose
    expected_missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.path} ({self.format}): loaded {len(self.loaded)} tensors, dropped {len(self.dropped)} "
            f"(text tower / original head), missing {self.missing or 'none'}, unexpected {self.unexpected or 'none'}, "
            f"fresh {self.expected_missing or 'none'}"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """Read a local safetensors / torch (.pt, .pth, .bin, TorchScript) file into a flat tensor dict.

    Unwraps ``state_dict``/``model``/``module`` containers and strips ``module.``/``_orig_mod.`` prefixes.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained vision checkpoint not found: {str(p)!r}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: object = load_file(str(p), device="cpu")
    else:
        raw = _torch_load(p)
    sd = _unwrap(raw, p)
    return _strip_wrapper_prefixes(sd)


def _torch_load(p: Path) -> object:
    if _is_torchscript(p):
        # OpenAI's released CLIP .pt files are TorchScript archives; jit.load deserialises TorchScript (not pickle)
        # and so, like weights_only below, does not execute arbitrary Python.
        return torch.jit.load(str(p), map_location="cpu").state_dict()
    # weights_only: a checkpoint from the internet must not be able to run code on the training nodes.
    return torch.load(p, map_location="cpu", weights_only=True)


def _is_torchscript(p: Path) -> bool:
    if not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def _unwrap(raw: object, p: Path) -> StateDict:
    sd = raw
    # Nested containers: open_clip saves {"epoch", "state_dict", "optimizer"}; DeepSpeed/DeiT use "module"/"model".
    for _ in range(3):
        if not isinstance(sd, Mapping):
            break
        inner = next((sd[k] for k in _CONTAINER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping):
        raise ValueError(f"{str(p)!r} does not contain a state dict (got {type(sd).__name__})")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{str(p)!r} contains no tensors (top-level keys: {sorted(map(str, sd))[:10]})")
    return tensors


def _strip_wrapper_prefixes(sd: StateDict) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for pre in _WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k = k[len(pre) :]
                    changed = True
        out[k] = v
    return out


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """``openai`` (visual.conv1 / resblocks layout, also open_clip's native ViT), ``open_clip`` (any other
    ``visual.``-prefixed layout, e.g. a timm trunk under ``visual.trunk.`` or EVA-CLIP) or ``timm``."""
    if "visual.class_embedding" in sd or "visual.conv1.weight" in sd:
        return "openai"
    if any(k.startswith("visual.") for k in sd):
        return "open_clip"
    return "timm"


def _filter_fn(trunk: nn.Module) -> Callable[[StateDict, nn.Module], StateDict] | None:
    # timm keeps one converter per model family next to the model class (vision_transformer, eva, ...).
    mod = importlib.import_module(type(trunk).__module__)
    return getattr(mod, "checkpoint_filter_fn", None)


def to_trunk_state_dict(sd: StateDict, trunk: nn.Module) -> tuple[StateDict, str, list[str]]:
    """Map a checkpoint into ``trunk``'s key space. Returns (state dict, detected format, dropped keys)."""
    fmt = detect_format(sd)
    dropped: list[str] = []
    if fmt != "timm":
        # A full CLIP checkpoint: everything outside ``visual.`` is the text tower (token_embedding, transformer.*,
        # ln_final, text_projection, logit_scale); timm's converters ignore it but we want it reported as dropped.
        dropped += [k for k in sd if not k.startswith("visual.")]
        sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
        if any(k.startswith("visual.trunk.") for k in sd):
            # open_clip's timm wrapper: the trunk is visual.trunk.*, the rest (visual.head.proj) is its projection.
            dropped += [k for k in sd if not k.startswith("visual.trunk.")]
            sd = {k: v for k, v in sd.items() if k.startswith("visual.trunk.")}
    fn = _filter_fn(trunk)
    try:
        if fn is not None:
            out = fn(dict(sd), trunk)
        else:
            out = _strip_visual_prefix(sd)
    except RuntimeError as e:  # shape arithmetic inside timm's resamplers on an incompatible checkpoint
        raise ValueError(f"cannot convert checkpoint ({fmt} layout) for {type(trunk).__name__}: {e}") from e
    if fmt != "timm" and out and not any(k in trunk.state_dict() for k in out):
        # The family's filter did not know this prefix layout; fall back to plain prefix stripping.
        out = _strip_visual_prefix(sd)
    # The trunk is built with num_classes=0; the original classifier/projection is replaced by a fresh head.
    own = trunk.state_dict()
    kept: StateDict = {}
    for k, v in out.items():
        if k not in own and (k == "proj" or k.startswith(_HEAD_PREFIXES)):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, fmt, dropped


def _strip_visual_prefix(sd: Mapping[str, torch.Tensor]) -> StateDict:
    for pre in ("visual.trunk.", "visual."):
        if any(k.startswith(pre) for k in sd):
            return {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    return dict(sd)


def check_shapes(sd: Mapping[str, torch.Tensor], trunk: nn.Module) -> None:
    own = trunk.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        lines = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in bad[:10])
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ValueError(f"checkpoint tensor shapes do not match {type(trunk).__name__}: {lines}{more}")


def streamable_keys(path: str | os.PathLike[str], trunk: nn.Module) -> tuple[dict[str, str], list[str]] | None:
    """(``{trunk key: file key}``, dropped head keys) when ``path`` is a safetensors file already in the trunk's own
    layout (timm's, as ``tools/convert_to_hf.py`` writes it): every tensor but the original head is a trunk tensor
    of the same shape, so timm's converter would change nothing and each tensor can be read on its own. None
    otherwise."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    own = trunk.state_dict(keep_vars=True)
    keys: dict[str, str] = {}
    dropped: list[str] = []
    with safe_open(str(path), framework="pt") as reader:
        for file_key in reader.keys():
            key = next(iter(_strip_wrapper_prefixes({file_key: torch.empty(0)})))
            if key.startswith(_HEAD_PREFIXES) and key not in own:
                dropped.append(key)  # the original classifier, dropped as the whole-file path drops it
                continue
            if key not in own or tuple(reader.get_slice(file_key).get_shape()) != tuple(own[key].shape):
                return None
            keys[key] = file_key
    return keys, dropped


@torch.no_grad()
def _load_streamed(trunk: nn.Module, path: str | os.PathLike[str], keys: dict[str, str]) -> None:
    """Copy each tensor from the file into its (already allocated) trunk tensor, converting dtype and device on the
    way: host memory peaks at one tensor, not at the file plus an fp32 model."""
    from safetensors import safe_open

    own = trunk.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt") as reader:
        for key, file_key in keys.items():
            own[key].copy_(reader.get_tensor(file_key))


def load_pretrained_trunk(trunk: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    """Load a local checkpoint into a timm trunk (built with ``num_classes=0``).

    A safetensors file in timm's layout is read tensor by tensor into the trunk's own storage (any device and
    dtype); other files and layouts (torch pickles, open_clip / OpenAI / EVA-CLIP layouts that need timm's
    converter, which takes the whole state dict) are read whole — convert such a file once with
    ``tools/convert_to_hf.py`` (its ``vision/model.safetensors`` is timm's layout) to start ViT-E-sized runs lean.
    Raises FileNotFoundError for a missing file, ValueError for shape mismatches, and — when ``strict`` — a
    ValueError listing trunk keys the checkpoint lacks or checkpoint keys the trunk does not have.
    """
    own = trunk.state_dict()
    streamable = streamable_keys(path, trunk)
    if streamable is not None:
        keys, dropped = streamable
        missing = sorted(k for k in own if k not in keys)
        report = LoadReport(path=str(path), format="timm", loaded=sorted(keys), missing=missing,
                            dropped=sorted(dropped))
        if strict and missing:
            raise ValueError(f"pretrained checkpoint {str(path)!r} (timm) does not fit {type(trunk).__name__}: "
                             f"missing {missing[:20]}{'...' if len(missing) > 20 else ''}, unexpected []")
        _load_streamed(trunk, path, keys)
        (logger.warning if missing else logger.info)("pretrained load (streamed): %s", report.summary())
        return report
    sd, fmt, dropped = to_trunk_state_dict(read_checkpoint(path), trunk)
    check_shapes(sd, trunk)
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    report = LoadReport(
        path=str(path),
        format=fmt,
        loaded=sorted(k for k in sd if k in own),
        missing=missing,
        unexpected=unexpected,
        dropped=sorted(dropped),
    )
    if strict and (missing or unexpected):
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} ({fmt}) does not fit {type(trunk).__name__}: "
            f"missing {missing[:20]}{'...' if len(missing) > 20 else ''}, "
            f"unexpected {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}"
        )
    trunk.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if missing or unexpected:
        logger.warning("partial pretrained load: %s", report.summary())
    else:
        logger.info("pretrained load: %s", report.summary())
    return report
