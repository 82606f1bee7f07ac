"""Fault injection for tests/test_slurm.py: with LLM2CLIP_TEST_STALL="rank=R,step=S,seconds=T" on PYTHONPATH's
front, rank R sleeps T seconds inside training step S (a stand-in for a wedged rank). Imported by Python at start-up
of every process that has this directory on PYTHONPATH; inert without the variable."""

import os

_SPEC = os.environ.get("LLM2CLIP_TEST_STALL")
if _SPEC:
    import time

    _opts = dict(item.split("=") for item in _SPEC.split(","))
    _rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if _rank == int(_opts["rank"]):
        from llm2clip_scale.train.stage2 import Stage2Task

        _step = Stage2Task.step
        _calls = [0]

        def _stalling_step(self, batch):
            _calls[0] += 1
            if _calls[0] == int(_opts["step"]):
                time.sleep(float(_opts["seconds"]))
            return _step(self, batch)

        Stage2Task.step = _stalling_step
