"""Build the synthetic compositional demo set: webdataset shards, a word-level tokenizer and dataset.json.

    python data_prep/make_synthetic.py --out data/synthetic [--train-samples 4000] [--eval-samples 500] ...

Reuses a complete dataset built with the same parameters unless --force; builds in a temp dir and renames, so an
interrupted run never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import argparse
import sys
import time

from llm2clip_scale.data.synthetic import SPLITS, SyntheticParams, build_synthetic_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SyntheticParams()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-samples", type=int, default=defaults.train_samples)
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete dataset is there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = SyntheticParams(
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
    )
    start = time.perf_counter()
    try:
        result = build_synthetic_dataset(args.out, params, force=args.force)
    except (FileExistsError, ValueError) as err:
        print(f"make_synthetic: {err}", file=sys.stderr)
        return 2
    summary = result.summary
    verb = "already complete, reused" if result.reused else f"wrote in {time.perf_counter() - start:.1f} s"
    print(f"{args.out}: {verb}")
    for split in SPLITS:
        info = summary["splits"][split]
        print(f"  {split}: {info['samples']} samples in {info['shards']} shard(s): {args.out}/{info['pattern']}")
    print(f"  tokenizer: {args.out}/{summary['tokenizer']} (vocab size {summary['vocab_size']})")
    print(
        f"  caption fields: {', '.join(summary['caption_fields'])}; image {params.image_size}px png; seed {params.seed}"
    )
    print(f"  eval extras: {summary['multi_caption_field']} (paraphrases), {summary['label_field']} (zero-shot class "
          f"of 1-object scenes), {args.out}/{summary['zeroshot']} (class names and templates); see docs/EVAL.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
