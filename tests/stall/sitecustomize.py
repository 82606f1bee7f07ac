"""Fault injection for tests, imported by Python at start-up of every process that has this directory at the front
of PYTHONPATH; inert without the variables below.

- ``LLM2CLIP_TEST_STALL="rank=R,step=S,seconds=T"`` (tests/test_slurm.py): rank R sleeps T seconds inside training
  step S, a stand-in for a wedged rank.
- ``LLM2CLIP_TEST_SLOW_STEPS="after=S,seconds=T"`` (tests/test_resume.py): every rank sleeps T seconds before each
  step after step S, whatever the stage, so that a test killing the run after a logged step lands before the run
  ends (a tiny run otherwise finishes in the time a busy machine takes to notice the step). Timing only: every step
  computes what it would have.
"""

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

_SLOW = os.environ.get("LLM2CLIP_TEST_SLOW_STEPS")
if _SLOW and "RANK" in os.environ:  # training ranks only, not torchrun's launcher
    import time

    import llm2clip_scale.train.loop as _loop

    _slow = dict(item.split("=") for item in _SLOW.split(","))
    _train = _loop._train

    def _slow_train(cfg, task, topo, loop, *rest):
        step = task.step

        def slow_step(batch):
            if loop.step + 1 > int(_slow["after"]):
                time.sleep(float(_slow["seconds"]))
            return step(batch)

        task.step = slow_step
        return _train(cfg, task, topo, loop, *rest)

    _loop._train = _slow_train
