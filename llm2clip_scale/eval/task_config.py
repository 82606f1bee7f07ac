"""Which eval tasks a config asks for, where their data is, and the config checks (imported by config/load.py, so
it imports nothing heavy)."""

from __future__ import annotations

import json
from pathlib import Path

from llm2clip_scale.config.schema import Config

TASKS: tuple[str, ...] = ("long_retrieval", "retrieval", "zeroshot", "cra")
LLM_TASKS: tuple[str, ...] = ("retrieval", "zeroshot", "cra")  # these embed captions with the LLM online
ZEROSHOT_FILE = "zeroshot.json"
RESULT_FILE = "eval.json"  # under logging.dir, written by `llm2clip-scale eval` (a checkpoint or an export)


def write_eval_result(cfg: Config, result: dict) -> None:
    """``result`` as ``<logging.dir>/eval.json``."""
    out = Path(cfg.logging.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")


def task_source(cfg: Config, task: str) -> str | None:
    """Where ``task`` reads its data: its own eval.<task>_data, else data.eval_shards; None when neither is set."""
    own = {"retrieval": cfg.eval.retrieval_data, "zeroshot": cfg.eval.zeroshot_data, "cra": cfg.eval.cra_data}
    return own.get(task) or cfg.data.eval_shards or None


def zeroshot_classes_path(cfg: Config) -> Path | None:
    if cfg.eval.zeroshot_classes:
        return Path(cfg.eval.zeroshot_classes)
    source = task_source(cfg, "zeroshot")
    return None if source is None else Path(source).parent / ZEROSHOT_FILE


def eval_task_problems(cfg: Config) -> list[str]:
    """Config problems of eval.tasks, for config/load.py's validate."""
    tasks, problems = cfg.eval.tasks, []
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        problems.append(f"eval.tasks: {list(tasks)} must name distinct tasks of {', '.join(TASKS)}")
    llm_tasks = [t for t in tasks if t in LLM_TASKS]
    if llm_tasks and cfg.train.stage != "stage2":
        problems.append(f"eval.tasks: {', '.join(llm_tasks)} run on stage-2 models only (train.stage=stage2)")
    for task in llm_tasks:
        source = task_source(cfg, task)
        if source is None:
            problems.append(f"eval.tasks: {task} has no data; set eval.{task}_data or data.eval_shards")
        elif Path(source).suffix in (".jsonl", ".csv"):
            if not Path(source).is_file():
                problems.append(f"eval.{task}_data: {source} is not a file")
        elif source != cfg.data.eval_shards:  # data.eval_shards is checked as such
            # A missing shard would end a long run at its first evaluation: refuse it before anything starts.
            from llm2clip_scale.config.load import _missing_files

            problems += _missing_files(f"eval.{task}_data", source, "fix the pattern")
    if llm_tasks and not cfg.model.llm.tokenizer:
        problems.append(f"model.llm.tokenizer: eval tasks {', '.join(llm_tasks)} embed captions online; give the "
                        "tokenizer directory")
    if "zeroshot" in tasks and task_source(cfg, "zeroshot") is not None:
        path = zeroshot_classes_path(cfg)
        if not path.is_file():
            problems.append(f"eval.zeroshot_classes: {path} is not a file; give a json with 'classes' and 'templates'")
    return problems
