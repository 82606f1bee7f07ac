"""Launching on Slurm: preemption and time-limit handling (signals -> stop flag -> collective save -> requeue) and
submission through submitit. The sbatch scripts under slurm/ are the other way in; both end in the same loop."""
