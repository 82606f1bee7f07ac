"""tools/first_gpu_check.py's checks (run in the driver) and workers (run in subprocesses)."""
