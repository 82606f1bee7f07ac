"""Command line: ``llm2clip-scale <command> CONFIG [dotted.key=value ...]``, and ``llm2clip-scale env [--json]``.

Multi-rank runs are launched by torchrun or srun, one process per rank; every rank runs the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from llm2clip_scale.config.load import ConfigError, load_config, validate, world_size_from_env
from llm2clip_scale.launch import configure_rank_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2clip-scale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the stage named by train.stage; prints one JSON result line")
    check = commands.add_parser("validate", help="load, override and validate a config without starting anything")
    cra = commands.add_parser("cra", help="CRA of the LLM tower on stage1.eval_pairs; one JSON line")
    cra.add_argument("--lora", default=None, help="stage-1 LoRA: lora.safetensors, a step dir or a checkpoint root")
    evaluate = commands.add_parser("eval", help="eval.tasks on a stage-2 model (docs/EVAL.md); one JSON line")
    evaluate.add_argument("--tasks", default=None, help="comma-separated: long_retrieval,retrieval,zeroshot,cra "
                          "(default: eval.tasks)")
    evaluate.add_argument("--checkpoint", default=None, help="a stage-2 step dir or checkpoint root (its latest)")
    evaluate.add_argument("--export", default=None, help="instead: a tools/convert_to_hf.py folder (one process)")
    for sub in (train, check, cra, evaluate):
        sub.add_argument("config", help="YAML file under configs/")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 parallel.zero_stage=2")
    check.add_argument("--world-size", type=int, default=None, help="ranks to validate against (default: env)")
    check.add_argument("--print", action="store_true", help="print the merged config as YAML")
    from llm2clip_scale.launch.submit import add_submit_parser

    add_submit_parser(commands)
    from llm2clip_scale.plan.report import add_plan_parser

    add_plan_parser(commands)
    env = commands.add_parser("env", help="print versions, devices and which fused kernels are active, and why")
    env.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect = commands.add_parser("inspect", help="a checkpoint's step, config, layout, files and integrity")
    inspect.add_argument("checkpoint", help="a step directory, or a checkpoint root (its 'latest' is shown)")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument("--no-verify", action="store_true", help="skip the checksum pass over every file")
    inspect.add_argument("--config", action="store_true", help="also print the run's full config")
    report = commands.add_parser("report", help="a PNG of a run's loss, lr, logit scale and eval curves")
    report.add_argument("run_dir", help="the run's logging.dir (holding metrics.jsonl), or a run root with logs/")
    report.add_argument("--out", default=None, help="PNG path (default: report.png next to metrics.jsonl)")
    return parser


def _report(args: argparse.Namespace) -> int:
    from llm2clip_scale.metrics.report import ReportError, missing_panels, write_report

    try:
        out, records = write_report(args.run_dir, args.out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    steps = len(records.steps["loss"][0]) if "loss" in records.steps else 0
    evals = len(next(iter(records.evals.values()))[0]) if records.evals else 0
    print(f"{out}: {steps} steps, {evals} evaluations from {records.path}")
    if records.malformed or records.superseded:
        print(f"skipped {records.malformed} malformed lines; {records.superseded} lines superseded by a resume")
    if missing := missing_panels(records):
        print(f"not logged by this run: {', '.join(missing)}")
    if records.stale_result_steps is not None:
        print(f"result.json is of step {records.stale_result_steps}, not the last logged step: not shown")
    elif records.result is None:
        print("no result.json: the run has not finished (the table shows the last logged values)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from llm2clip_scale.checkpoint.layout import CheckpointError, describe

    try:
        report = describe(args.checkpoint, verify=not args.no_verify)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0 if report.get("integrity", "ok") == "ok" else 1
    config = report.pop("config")
    problems = report.pop("problems", [])
    for key, value in report.items():
        print(f"{key:>13}: {value}")
    for problem in problems:
        print(f"      problem: {problem}")
    if args.config:
        print(json.dumps(config, indent=2))
    return 0 if not problems else 1


def _env(as_json: bool) -> int:
    from llm2clip_scale.kernels import environment, format_environment

    report = environment()
    print(json.dumps(report) if as_json else format_environment(report))
    return 0


# Known start-up noise, repeated once per rank: optional GPU extras that are absent, and deprecations inside the
# libraries (not in our code). `llm2clip-scale env` reports which fused implementations are active instead.
_QUIET = (
    r".*(Apex|Transformer Engine).* not installed.*",
    r"full scope is deprecated.*",
    r".*torch\.distributed\.all_gather_into_tensor.* is deprecated.*",
)


def _quiet_library_warnings() -> None:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    _quiet_library_warnings()
    parser = _parser()
    # Overrides may follow options (``validate cfg.yaml --world-size 4 train.lr=1``): collect the leftovers too.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-")]
    if args.command != "submit" and (unknown or (args.command in ("env", "inspect", "report") and extra)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if args.command == "env":  # needs no config
        return _env(args.json)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "plan":  # arithmetic only: no process group, no file checks
        from llm2clip_scale.plan.report import run_plan

        args.overrides = [*args.overrides, *extra]
        return run_plan(args)
    if args.command == "report":
        return _report(args)
    if args.command == "submit":
        from llm2clip_scale.launch.submit import submit

        return submit(args, extra)
    args.overrides = [*args.overrides, *extra]
    if args.command == "eval" and args.tasks:
        args.overrides.append(f"eval.tasks=[{args.tasks}]")
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    configure_rank_logging(rank)
    try:
        cfg = load_config(args.config, args.overrides)
        world_size = getattr(args, "world_size", None)
        validate(cfg, world_size if world_size is not None else world_size_from_env())
        if args.command == "validate":
            if args.print:
                from omegaconf import OmegaConf

                print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            print(f"{args.config}: valid")
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.command == "train":
        from llm2clip_scale.launch.preemption import train_with_preemption

        result = train_with_preemption(cfg)  # shuts the process groups down, and requeues when a signal asked
    elif args.command == "eval":
        from llm2clip_scale.checkpoint.layout import CheckpointError
        from llm2clip_scale.distributed.topology import shutdown
        from llm2clip_scale.eval.run import evaluate_stage2

        try:
            if args.export is not None:
                if args.checkpoint is not None or world_size_from_env() != 1:
                    raise ValueError("--export: runs in one process, without --checkpoint")
                from llm2clip_scale.eval.export import evaluate_export

                result = evaluate_export(cfg, args.export)
            else:
                result = evaluate_stage2(cfg, args.checkpoint)
        except (ValueError, CheckpointError) as err:  # bad eval data or checkpoint: a message, not a traceback
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            shutdown()
    else:
        from llm2clip_scale.distributed.topology import shutdown
        from llm2clip_scale.train.llm2clip_cc import evaluate_checkpoint_cra

        result = evaluate_checkpoint_cra(cfg, args.lora)
        shutdown()
    if rank == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
