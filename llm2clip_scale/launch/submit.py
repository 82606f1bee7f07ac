"""``llm2clip-scale submit CONFIG``: the sbatch scripts' jobs submitted through submitit instead.

Training is a :class:`TrainJob`, submitit's ``Checkpointable`` pattern fitted to a collective save: submitit's
preemption/time-limit signal (USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) sets the loop's stop flag on
every rank; the ranks save one checkpoint together at the next step boundary; then rank 0 hands over to submitit's
own handler, which calls :meth:`TrainJob.checkpoint` (the same job again: it resumes with ``train.resume=auto``),
requeues the job and exits. ``--embed-captions SHARDS --out DIR --array N`` submits offline caption embedding as a
job array of N tasks, each embedding its part of the shards. ``--local`` runs either on this machine with
submitit's local executor.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

import submitit

from llm2clip_scale.config.load import ConfigError, load_config, validate
from llm2clip_scale.launch import configure_rank_logging

REPO = Path(__file__).resolve().parents[2]


def add_submit_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("submit", help="submit a training job (or an embedding array) through submitit")
    sub.add_argument("config", help="YAML file under configs/")
    sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5")
    sub.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    sub.add_argument("--gpus-per-node", type=int, default=8, help="also the ranks per node (one rank per GPU)")
    sub.add_argument("--cpus-per-task", type=int, default=12, help="cores per rank (loader workers live there)")
    sub.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    sub.add_argument("--account", default=None, help="Slurm account to charge")
    sub.add_argument("--time", default="48:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    sub.add_argument("--signal-delay", type=int, default=300, help="seconds before the limit to save and requeue")
    sub.add_argument("--max-requeues", type=int, default=20, help="time-limit requeues before the job gives up")
    sub.add_argument("--folder", default="logs/submitit", help="submitit's job folder (scripts, logs, pickles)")
    sub.add_argument("--local", action="store_true", help="run here with submitit's local executor (development)")
    sub.add_argument("--no-exclusive", action="store_true", help="share nodes (the default asks for whole nodes)")
    sub.add_argument("--wait", action="store_true", help="wait for the job and print its result (rank 0's)")
    sub.add_argument("--embed-captions", metavar="SHARDS", default=None,
                     help="instead of training: embed the captions of these image shards offline (needs --out)")
    sub.add_argument("--out", default=None, help="with --embed-captions: the sidecar directory")
    sub.add_argument("--array", type=int, default=1, help="with --embed-captions: split the shards over N tasks")


def parse_time_minutes(text: str) -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) to whole minutes, as submitit takes them."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: use minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match.group(1) is None and match.group(3) is None:
        return first  # plain minutes
    if match.group(1) is None and match.group(4) is None:
        return max(1, first + (second > 0))  # MM:SS
    hours, minutes, seconds = first, second, third
    return days * 1440 + hours * 60 + minutes + (seconds > 0)


class TrainJob(submitit.helpers.Checkpointable):
    """One rank of a training job; submitit pickles it, runs it on every task and calls :meth:`checkpoint`."""

    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from llm2clip_scale.launch.preemption import train_with_preemption

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        configure_rank_logging(int(os.environ["RANK"]))
        requeue_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        submitit_handler = signal.getsignal(requeue_signal)  # submitit's checkpoint_and_try_requeue

        def requeue() -> None:
            if callable(submitit_handler):
                submitit_handler(requeue_signal, None)  # checkpoint() -> dump -> scontrol requeue -> exit

        cfg = load_config(self.config, self.overrides)
        return train_with_preemption(cfg, requeue_signals=(requeue_signal,), requeue=requeue)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The model state is already on disk (the collective save); the requeued job finds it with resume=auto.
        overrides = [item for item in self.overrides if not item.startswith("train.resume=")]
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, [*overrides, "train.resume=auto"]))


class EmbedCaptionsPart:
    """Array task ``index`` of ``parts``: data_prep/embed_captions.py on its slice of the shards."""

    def __init__(self, config: str, shards: str, out: str, parts: int, overrides: list[str]) -> None:
        self.config, self.shards, self.out, self.parts, self.overrides = config, shards, out, parts, list(overrides)

    def __call__(self, index: int) -> int:
        sys.path.insert(0, str(REPO / "data_prep"))
        from embed_captions import main as embed_main

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        configure_rank_logging(int(os.environ["RANK"]))
        status = embed_main([self.config, "--shards", self.shards, "--out", self.out,
                             "--part", f"{index}/{self.parts}", *self.overrides])
        if status:
            raise RuntimeError(f"embed_captions part {index}/{self.parts} exited with status {status}")
        return status


def _executor(args: argparse.Namespace, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=args.folder, cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    env_setup = [f"source {REPO / 'slurm' / 'env.sh'}"]  # the same NCCL/threading defaults as the sbatch scripts
    executor.update_parameters(
        name=name,
        nodes=args.nodes,
        tasks_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=parse_time_minutes(args.time),
        slurm_gpus_per_node=args.gpus_per_node,
        slurm_partition=args.partition,
        slurm_account=args.account,
        slurm_signal_delay_s=args.signal_delay,
        slurm_setup=env_setup,
        # srun stops inheriting --cpus-per-task from sbatch in Slurm 22.05: pass it on, and end the job when a rank
        # dies (the watchdog's exit) instead of leaving the others waiting in a collective.
        slurm_srun_args=[f"--cpus-per-task={args.cpus_per_task}", "--kill-on-bad-exit=1"],
        slurm_additional_parameters={"requeue": True, **({} if args.no_exclusive else {"exclusive": True})},
    )
    if args.no_exclusive or args.local:
        return executor
    executor.update_parameters(slurm_mem="0")  # every core's memory: each rank builds its tower on the host first
    return executor


def _submitit_logs_to_stderr() -> None:
    """submitit logs every level to stdout (and warnings to stderr as well); stdout is for the job ids and results
    that scripts parse (a polling warning there once broke ``--wait``'s output), so its stdout handler moves to
    stderr, keeping only the levels the stderr handler does not already print."""
    import logging

    import submitit  # noqa: F401 - configures its logger on import

    for handler in logging.getLogger("submitit").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
            handler.addFilter(lambda record: record.levelno < logging.WARNING)


def submit(args: argparse.Namespace, extra: list[str]) -> int:
    overrides = [*args.overrides, *(item for item in extra if not item.startswith("-"))]
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        print(f"error: unrecognized arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, overrides)  # every config problem now, not after the queue wait
        if args.embed_captions is None:
            validate(cfg, args.nodes * args.gpus_per_node)
        elif not args.out or args.array < 1:
            raise ConfigError("--embed-captions needs --out DIR and --array N >= 1")
        timeout = parse_time_minutes(args.time)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _submitit_logs_to_stderr()
    if args.embed_captions is None:
        executor = _executor(args, f"l2c-{cfg.train.stage}")
        jobs = [executor.submit(TrainJob(args.config, overrides))]
    else:
        executor = _executor(args, "l2c-embed-captions")
        part = EmbedCaptionsPart(args.config, args.embed_captions, args.out, args.array, overrides)
        jobs = executor.map_array(part, range(args.array))
    print(f"submitted {len(jobs)} job(s): {' '.join(job.job_id for job in jobs)} "
          f"(time limit {timeout} min; logs under {args.folder})", flush=True)
    if not args.wait:
        return 0
    import json

    for job in jobs:
        # One result per task (rank); rank 0's stands for the job. Raises with the job's traceback when it failed.
        print(json.dumps(job.results()[0]), flush=True)
    return 0
