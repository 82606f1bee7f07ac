"""Probes of what the full-size model costs, each in a process of its own like workers.py's: host memory while
building towers from checkpoints (and writing those checkpoints), the reduced ViT-E stage-2 step."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm2clip_scale.metrics.host_memory import proc_status_kb, reset_peak

from .context import REPO
from .workers import init_world, tensor_facts


def _proc_status() -> dict[str, int]:
    """/proc/self/status memory fields in bytes."""
    return {key: kb * 1024 for key, kb in proc_status_kb().items()}


class HostPeak:
    """Peak anonymous host memory (RssAnon: heap and anonymous maps, not the page cache of mapped files) while the
    block runs, sampled every millisecond: what a rank actually holds. Copies into the GPU release the GIL, and a
    whole-file load would hold its gigabytes for far longer than a sampling period. VmHWM (the kernel's exact peak
    of all resident pages, including the checkpoint's mapped file pages) is reset at entry where the kernel allows
    and reported beside it."""

    def __enter__(self) -> HostPeak:
        reset_peak()  # VmHWM from here, where the kernel allows
        status = _proc_status()
        self.base_anon, self.base_hwm = status["RssAnon"], status["VmHWM"]
        self.peak_anon = self.base_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _proc_status()["RssAnon"])
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = _proc_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.anon_growth = self.peak_anon - self.base_anon
        self.hwm_growth = status["VmHWM"] - self.base_hwm


def _llm_hf_config(spec: dict) -> dict:
    """An HF Llama config.json: Llama-3-8B's widths and RoPE, ``llm_layers`` layers (tiny widths for the CPU smoke)."""
    if spec.get("tiny"):
        widths = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                  "vocab_size": 256}
    else:
        widths = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 14336, "vocab_size": 128256}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": spec["llm_layers"],
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 8192,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", **widths}


def _vision_config(spec: dict, path: str | None):
    from llm2clip_scale.config.schema import VisionConfig

    kwargs = {"depth": spec["vision_depth"], **({"embed_dim": 64, "num_heads": 4} if spec.get("tiny") else {})}
    return VisionConfig(name="eva02_enormous_patch14_clip_224", image_size=224, timm_kwargs=kwargs,
                        pretrained_path=path)


def worker_write_checkpoints(spec: dict) -> dict:
    """A reduced ViT-E trunk in timm's layout (fp32, as timm and open_clip release it) and a reduced Llama HF
    checkpoint (bf16, as Meta releases it). The values do not matter for memory, so they are zeros: no init compute."""
    import torch
    from safetensors.torch import save_file

    from llm2clip_scale.models.llm.hf_import import expected_shapes, llm_config_from_hf
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    vision_cfg = _vision_config(spec, None)
    trunk = build_vision_tower(vision_cfg, 1024, device="meta").trunk
    tensors = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in trunk.state_dict().items()}
    vision_path = out / "vit_e_reduced.safetensors"
    save_file(tensors, str(vision_path))
    vision = {"path": str(vision_path), "largest": max(t.numel() * 4 for t in tensors.values()),
              "fp32": sum(t.numel() * 4 for t in tensors.values())}
    del tensors
    llm_dir = out / "llama_reduced"
    llm_dir.mkdir(exist_ok=True)
    (llm_dir / "config.json").write_text(json.dumps(_llm_hf_config(spec), indent=2))
    shapes = expected_shapes(llm_config_from_hf(llm_dir))
    save_file({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()},
              str(llm_dir / "model.safetensors"))
    numels = [math.prod(shape) for shape in shapes.values()]
    # load_into_tower reads gate and up together for the fused fc1, then concatenates them (two tensors' worth).
    ffn = 2 * math.prod(next(s for n, s in shapes.items() if n.endswith("gate_proj.weight")))
    llm = {"path": str(llm_dir), "largest": 2 * max(max(numels), ffn), "fp32": 4 * sum(numels)}
    return {"vision": vision, "llm": llm}


def worker_host_memory(spec: dict) -> dict:
    import torch

    from llm2clip_scale.models.llm.hf_import import llm_config_from_hf
    from llm2clip_scale.models.llm.tower import build_text_tower
    from llm2clip_scale.models.vision.timm_tower import build_vision_tower

    device = torch.device(spec["device"])
    topo = init_world("nccl" if device.type == "cuda" else "gloo")  # the LLM tower needs megatron's groups
    cuda = device.type == "cuda"

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def describe(module: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
        # Weight matrices carry the memory; norm weights may stay fp32 (megatron's torch-norm fallback allocates
        # them in the default dtype), so they are reported apart.
        params = list(module.parameters())
        matrices, vectors = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        return tensor_facts(matrices)[0], tensor_facts(vectors)[0], tensor_facts(params)[1]

    def measure(what: str, facts: dict, build: Callable[[], torch.nn.Module]) -> dict:
        """Host and device growth while ``build`` runs, beside the file's largest tensor and fp32 size."""
        before = allocated()
        with HostPeak() as peak:
            module = build()
        dtypes, vector_dtypes, devices = describe(module)
        record = {"what": what, "anon_growth": peak.anon_growth, "hwm_growth": peak.hwm_growth,
                  "device_growth": allocated() - before, "largest_tensor_bytes": facts["largest"],
                  "fp32_bytes": facts["fp32"], "param_dtypes": dtypes, "vector_dtypes": vector_dtypes,
                  "param_devices": devices}
        del module
        gc.collect()
        return record

    cfg = dataclasses.replace(llm_config_from_hf(spec["llm"]["path"]), layer_spec="local")
    return {
        "vision": measure(f"ViT-E {spec['vision_depth']} blocks", spec["vision"], lambda: build_vision_tower(
            _vision_config(spec, spec["vision"]["path"]), 1024, device=device, dtype=torch.bfloat16)),
        "llm": measure(f"Llama {spec['llm_layers']} layers", spec["llm"],
                       lambda: build_text_tower(cfg, params_dtype=torch.bfloat16, device=topo.device)),
    }


def worker_big_step(spec: dict) -> dict:
    import torch

    from llm2clip_scale.config import load_config
    from llm2clip_scale.config.load import validate
    from llm2clip_scale.train.loop import seed_everything
    from llm2clip_scale.train.stage2 import Stage2Task

    points = []
    topo = None
    for k in spec["scales"]:
        kwargs = {"depth": 2 * k, **spec["vision_kwargs"]}
        inline = ", ".join(f"{key}: {value}" for key, value in kwargs.items())
        cfg = load_config(REPO / "configs" / "stage2_vit_e.yaml",
                          [*spec["overrides"], f"model.vision.timm_kwargs={{{inline}}}", f"model.llm.num_layers={k}"])
        validate(cfg, 1)
        if topo is None:
            topo = init_world(cfg.parallel.backend)
        cuda = topo.device.type == "cuda"
        seed_everything(0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        task = Stage2Task()
        task.build(cfg, topo)
        # The longest captions the config allows (max_text_len) and random images: a worst case for the step time.
        b, size, length = cfg.train.micro_batch, cfg.model.vision.image_size, cfg.data.max_text_len
        gen = torch.Generator().manual_seed(k)
        batch = {"images": torch.randn(b, 3, size, size, generator=gen),
                 "input_ids": torch.randint(0, cfg.model.llm.vocab_size, (b, length), generator=gen),
                 "attention_mask": torch.ones(b, length, dtype=torch.long),
                 "pool_mask": torch.ones(b, length, dtype=torch.long)}
        bf16_error = None
        try:  # the first (warm-up) step: where a dtype mix shows
            losses = [task.step([batch]).loss]
        except RuntimeError as err:  # reported as a FAIL; measured with the buffer cast, so the numbers exist too
            if "dtype" not in str(err) or not _cast_k_bias(task.engine.module):
                raise
            bf16_error, losses = f"{type(err).__name__}: {err}", []
        times = []
        for i in range(spec["warmup"] - 1 + spec["timed"]):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(task.step([batch]).loss)
            if cuda:
                torch.cuda.synchronize()
            if i >= spec["warmup"] - 1:
                times.append(time.perf_counter() - start)
        module = task.engine.module
        points.append({
            "k": k, "bf16_error": bf16_error, "vision_depth": 2 * k, "llm_layers": k, "micro_batch": b,
            "image_size": size, "text_len": length,
            "layer_spec": task.step_fn.text_tower.layer_spec, "losses": losses,
            "step_seconds": sorted(times)[len(times) // 2],
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "llm_params": sum(p.numel() for p in task.step_fn.text_tower.parameters()),
        })
        del task, module
        gc.collect()
    return {"points": points}


def _cast_k_bias(module: Any) -> list[str]:
    """timm's EVA attention builds its qkv bias as cat(q_bias, k_bias, v_bias), k_bias a zero non-persistent buffer.
    Buffers stay fp32 under bf16 (build_vision_tower, DeepSpeed), so the bias comes out fp32 and F.linear refuses it
    beside bf16 weights. Casting that zero buffer to the parameters' dtype is exact; returns the modules changed."""
    changed = []
    for name, sub in module.named_modules():
        k_bias, q_bias = sub._buffers.get("k_bias"), getattr(sub, "q_bias", None)
        if k_bias is not None and q_bias is not None and k_bias.dtype != q_bias.dtype:
            sub._buffers["k_bias"] = k_bias.to(q_bias.dtype)
            changed.append(name)
    return changed
