"""Publish a training checkpoint as HuggingFace / timm folders, verified against the training-time model.

    python tools/convert_to_hf.py CHECKPOINT OUT_DIR [--step N] [--dtype float32|bfloat16] [--shard-size 2GB]
                                  [--no-verify] [--force] [--keep-reference FILE]
                                  [--set model.llm.tokenizer=DIR ...]

CHECKPOINT is a step directory (…/step<N>) or a checkpoint root holding ``latest``, of any stage (llm2clip_cc,
proclip_inherit, stage2) and any TP/PP/DP/ZeRO layout; the export runs in this one process. The layout of OUT_DIR is
described in llm2clip_scale/export/__init__.py and README.md ("Publishing"). Exit status: 0 done (one JSON summary
line on stdout), 1 verification failed (the export is left in OUT_DIR.partial), 2 an input problem (one line on
stderr saying what and how to fix it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_to_hf.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step directory, or a checkpoint root holding 'latest'")
    parser.add_argument("out_dir", help="the export folder to create (written as OUT_DIR.partial, renamed at the end)")
    parser.add_argument("--step", type=int, default=None, help="export step N of a checkpoint root (default: latest)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weight dtype of the export (default float32; verified to 1e-5, bfloat16 to 3e-2)")
    parser.add_argument("--shard-size", default="2GB", help="largest text weight shard, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading the export with stock transformers/timm and comparing outputs")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--keep-reference", default=None, metavar="FILE",
                        help="save the verifier's inputs and reference outputs to FILE (rerun verify_export.py on it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recorded config value, e.g. a moved model.llm.tokenizer or hf_checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from llm2clip_scale.export.convert import VerificationError, export_checkpoint
    from llm2clip_scale.export.source import ExportError

    try:
        # Libraries print progress on stdout (DeepSpeed's logger binds it when first imported, which happens in
        # here); stdout is kept for the one JSON result line.
        with contextlib.redirect_stdout(sys.stderr):
            record = export_checkpoint(args.checkpoint, args.out_dir, step=args.step, dtype=args.dtype,
                                       shard_size=args.shard_size, verify=args.verify, force=args.force,
                                       overrides=args.overrides, keep_reference=args.keep_reference)
    except ExportError as err:
        print(f"convert_to_hf: error: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"convert_to_hf: verification failed: {err}", file=sys.stderr)
        return 1
    verification = record.get("verification") or {}
    print(json.dumps({"out_dir": args.out_dir, "stage": record["stage"], "step": record["step"],
                      "dtype": record["dtype"], "text": record["text"]["architecture"],
                      "vision": (record.get("vision") or {}).get("architecture"),
                      "verified": bool(verification.get("passed")),
                      "max_rel_error": verification.get("max_rel_error"), "seconds": record["seconds"]}))
    return 0


if __name__ == "__main__":
    # Progress on stderr (stdout carries the one JSON result line); configured here so that calling main() from
    # another program leaves its logging alone.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="convert_to_hf: %(message)s")
    sys.exit(main())
