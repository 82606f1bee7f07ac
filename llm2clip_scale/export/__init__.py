"""Publish a training checkpoint as HuggingFace / timm folders, verified against the training-time model.

``tools/convert_to_hf.py CHECKPOINT OUT_DIR`` (any stage, any TP/PP/DP/ZeRO layout, one process) writes::

    OUT_DIR/
      text/                    transformers model folder: the LLM with any LoRA merged (+ adapter, logit scale)
        config.json            Llama/Qwen2/Mistral config + auto_map + an "llm2clip" section
        model-0000i-of-0000n.safetensors, model.safetensors.index.json
        modeling_llm2clip.py   the encoder class (torch + transformers only): AutoModel, trust_remote_code=True
        tokenizer files
      vision/                  timm folder: timm.create_model("local-dir:OUT_DIR/vision", pretrained=True)
      preprocessor_config.json image size, mean, std, resize and crop of the training eval transform
      adapter.safetensors, clip_config.json   the raw adapter and the joint-space settings (stages with an adapter)
      README.md                model card: provenance and a usage snippet
      export.json              provenance and the verification result

The modules, in the order the converter uses them: :mod:`.source` (resolve and check the checkpoint, rebuild its
config), :mod:`.text` (stream the LLM weights with the LoRA delta into shards, :mod:`.shards`), :mod:`.vision`
(consolidate the DeepSpeed state, timm folder), :mod:`.reference` (the training-time model's outputs),
``verify_export.py`` (a separate process that reloads the export with stock transformers and timm), :mod:`.card`
and :mod:`.convert` (the orchestration). Nothing heavy is imported here, so the CLI answers bad arguments fast.
"""

from llm2clip_scale.export.source import ExportError

__all__ = ["ExportError"]
