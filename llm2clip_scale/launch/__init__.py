"""Launching on Slurm: preemption and time-limit handling (signals -> stop flag -> collective save -> requeue) and
submission through submitit. The sbatch scripts under slurm/ are the other way in; both end in the same loop."""


def configure_rank_logging(rank: int) -> None:
    """INFO from rank 0, warnings from the others, each line tagged with its rank (the CLI and submitit jobs)."""
    import logging

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s")
