"""The comparison tables of docs/RESULTS.md from the runs of tools/results_synthetic.sh.

    python tools/results_tables.py runs/results [--out runs/results/tables.md]

Reads only what the runs wrote (result.json, eval.json); prints markdown tables, one per comparison.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RECALL = [f"r{k}_{d}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
MULTI = [f"retrieval/{m}" for m in RECALL]
ZEROSHOT = ["zeroshot/top1", "zeroshot/top5"]
CHANCE = {"long_retrieval": "chance", "retrieval": "retrieval/chance", "zeroshot": "zeroshot/chance",
          "cra": "cra/chance"}


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run tools/results_synthetic.sh)")
    return json.loads(path.read_text())


def _chance(metrics: dict, name: str) -> float:
    task = "long_retrieval" if "/" not in name else name.split("/")[0]
    base = metrics[CHANCE[task]]
    k = int(re.search(r"(?:r|top)(\d+)", name.split("/")[-1]).group(1))
    # R@k / top-k of a random ranking: k / N (the chance key is 1/N), capped at 1.
    return min(1.0, k * base)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _seeds(root: Path) -> list[int]:
    """Seeds with every stage-2 run and the baseline evaluated."""
    found = [int(p.name.rsplit("_s", 1)[1]) for p in root.glob("llm2clip_s2_s*")]
    names = ("llm2clip_s2", "stage2_nocc", "clip", "proclip_s2")
    return sorted(s for s in found if all((root / f"{n}_s{s}" / "eval.json").is_file() for n in names))


def _per_seed(root: Path, seeds: list[int], columns: list[tuple[str, str]], names: list[str]) -> str:
    """A table: one row per metric, for each seed one column per (run prefix, label), then chance."""
    runs = {(prefix, s): _read(root / f"{prefix}_s{s}" / "eval.json") for prefix, _ in columns for s in seeds}
    header = ["metric"] + [f"{label} s{s}" for s in seeds for _, label in columns] + ["chance"]
    first = runs[(columns[0][0], seeds[0])]
    rows = [[name] + [_fmt(runs[(prefix, s)].get(name)) for s in seeds for prefix, _ in columns]
            + [_fmt(_chance(first, name))] for name in names]
    return _table(header, rows)


def comparison_tables(root: Path) -> str:
    seeds = _seeds(root)
    if 0 not in seeds:
        raise FileNotFoundError(f"{root}: no complete seed-0 runs (run tools/results_synthetic.sh)")
    cc = _read(root / "cc_s0" / "result.json")
    nocc, llm2clip = _read(root / "stage2_nocc_s0" / "eval.json"), _read(root / "llm2clip_s2_s0" / "eval.json")
    out = ["## 1. Stage-1 CC and CRA\n"]
    out.append(_table(["metric", "untuned LLM", "after stage 1", "chance"], [
        ["CRA, stage 1's result.json (short caption → its long caption, no prefix)", _fmt(cc["cra_before"]),
         _fmt(cc["cra"]), _fmt(1 / cc["num_eval_pairs"])],
        ["CRA, paper protocol (caption 1 → caption 2, no prefix; `eval --tasks cra`)", _fmt(nocc["cra/top1"]),
         _fmt(llm2clip["cra/top1"]), _fmt(nocc["cra/chance"])],
    ]))
    out.append("\n## 2. Stage 2 on the untuned LLM and on the stage-1 tower (LLM2CLIP), every eval task\n")
    out.append(_per_seed(root, seeds, [("stage2_nocc", "untuned LLM"), ("llm2clip_s2", "LLM2CLIP")],
                         RECALL + MULTI + ZEROSHOT))
    out.append(f"\nSamples: long_retrieval {llm2clip['num_samples']}, retrieval {llm2clip['retrieval/num_images']} "
               f"images × {llm2clip['retrieval/num_captions']} captions, zeroshot {llm2clip['zeroshot/num_samples']} "
               f"images / {llm2clip['zeroshot/num_classes']} classes, cra {llm2clip['cra/num_pairs']} pairs.")
    out.append("\n## 3. LLM tower vs CLIP text tower, same stage-2 steps\n")
    out.append(_per_seed(root, seeds, [("llm2clip_s2", "LLM2CLIP"), ("stage2_nocc", "untuned LLM"),
                                       ("clip", "CLIP text")], RECALL + MULTI + ZEROSHOT))
    out.append("\n## 4. ProCLIP vs LLM2CLIP, same stage-2 steps, every eval task\n")
    out.append(_per_seed(root, seeds, [("llm2clip_s2", "LLM2CLIP"), ("proclip_s2", "ProCLIP")],
                         RECALL + MULTI + ZEROSHOT + ["cra/top1"]))
    for seed in seeds:
        inherit = root / f"proclip_inherit_s{seed}" / "result.json"
        if inherit.is_file():
            out.append(f"\nProCLIP stage 1 s{seed} result.json: {json.dumps(json.loads(inherit.read_text()))}")
    losses = {run.name: _read(run / "result.json").get("final_loss") for run in sorted(root.glob("*_s2_s*"))
              if (run / "result.json").is_file()}
    losses.update({run.name: _read(run / "result.json").get("final_loss") for run in sorted(root.glob("stage2_*"))
                   if (run / "result.json").is_file()})
    out.append(f"\nFinal training loss (last step): {json.dumps(losses)}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="runs/results")
    parser.add_argument("--out", help="also write the tables here")
    args = parser.parse_args(argv)
    text = comparison_tables(Path(args.root))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
