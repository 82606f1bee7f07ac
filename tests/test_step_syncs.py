"""Host synchronisations of a stage-2 and a ProCLIP stage-1 step, counted on 2 gloo ranks and held to what the step
needs.

On a GPU two things stall a step: a read of a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``.cpu()``: the CPU waits for everything queued before it) and a collective (a launch, and a wait for the slowest
rank). On CPU ranks neither stalls anything, so they are counted instead: a TorchDispatchMode sees every
``aten._local_scalar_dense`` (what ``.item()``/``bool``/``float`` of a tensor run) and every c10d / functional
collective, and ``Tensor.tolist``/``.numpy``/``.cpu`` are wrapped. The window of a step runs from ``task.step`` to
the loop's next batch fetch (so it holds the step, the loop's reduction, logging and checkpoint polling, and not the
data loader, whose tensors live on the host). Each event is charged to its owner by the innermost frame of this
package, DeepSpeed, megatron, torch.optim or transformers on its stack; ours are asserted against the budget below,
DeepSpeed's ZeRO, megatron's tensor parallelism, the CPU reference AdamW and ProCLIP's HF CLIP teacher are reported
(tools-style table under ``__main__``).

The table, from the repository root: ``python -m tests.test_step_syncs [--world 2] [--steps 4]``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import traceback
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.multiprocess import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
ACCUMULATION = 2  # micro-batches per rank and step in the offline run: per-micro-batch costs show as multiples
OWNERS = (("/llm2clip_scale/", "ours"), ("/deepspeed/", "zero"), ("/megatron/", "llm_tp"),
          ("/torch/optim/", "optimizer"), ("/transformers/", "hf_teacher"))  # ProCLIP's CLIP text teacher
NOT_LAUNCHES = ("wait_tensor", "_wrap_tensor_autograd")  # waits on / wrappers of a collective already counted
READS = ("tolist", "numpy", "cpu")  # host reads that dispatch nothing on a CPU tensor, so are wrapped instead


def budget(variant: str, micro_batches: int, world: int) -> dict[tuple[str, str], int]:
    """What a steady step of ours needs, by (kind, owner). Only SigLIP's ring depends on ``world``; no read does."""
    m = micro_batches
    if variant == "proclip":  # per-sample distillation: nothing gathered, nothing read but the loop's packed values
        # and, per micro-batch, its captions' lengths (both views' at once) for the LLM's bucket plan (host tensors)
        return {("collective", "ours"): 1, ("read", "ours"): 1 + m}
    if variant == "offline":  # InfoNCE
        loss = (2 * m  # image and text features gathered over the world (an all-gather, nothing read)
                + 2 * m)  # their backward: each row's gradient summed to its owner (reduce-scatter; gloo: all-reduce)
    else:  # SigLIP: the text blocks go round the ring, world - 1 hops of a send and a receive, and back in backward
        loss = m * 2 * 2 * (world - 1)
    collectives = loss + 1  # the loop's all-reduce of loss, terms and stop votes, every step; the metrics ride along
    reads = 1  # the loop's one read of that packed tensor
    if variant == "online_tp2":
        collectives += 2 * m  # per micro-batch: the TP group's caption lengths, then its token rows
        reads += m  # per micro-batch: the group's caption lengths, for the union's width and the bucket plan
    return {("collective", "ours"): collectives, ("read", "ours"): reads}


LOG_LINE_EXTRA = {("collective", "ours"): 1, ("read", "ours"): 1}  # skipped samples summed on log lines only


# ------------------------------------------------------------------------------------------ counting, in a rank


def _owner(op: str) -> tuple[str, str]:
    frames = traceback.extract_stack()[:-3]
    where = next(((frame, owner) for frame in reversed(frames) for key, owner in OWNERS if key in frame.filename),
                 None)
    if where is None:
        return "other", op
    frame, owner = where
    return owner, f"{op} @ {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"


class SyncCounter:
    """Per-window counts of host reads and collectives by owner, with where each came from."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = str(func)
                if "_local_scalar_dense" in name:
                    counter.record("read", name)
                elif name.startswith(("c10d.", "_c10d_functional.")) and not any(n in name for n in NOT_LAUNCHES):
                    counter.record("collective", name)
                return func(*args, **(kwargs or {}))

        self.mode_type = Mode
        self.mode = None
        self.windows: list[dict] = []
        self.current: collections.Counter = collections.Counter()
        for name in READS:
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrapped(name, original))

    def _wrapped(self, name: str, original):  # noqa: ANN001, ANN202
        def read(tensor: torch.Tensor, *args, **kwargs):  # noqa: ANN202
            if self.mode is not None:
                self.record("read", f"Tensor.{name}")
            return original(tensor, *args, **kwargs)
        return read

    def record(self, kind: str, op: str) -> None:
        owner, where = _owner(op)
        self.current[(kind, owner, where)] += 1

    def open(self) -> None:
        if self.mode is None:
            self.mode = self.mode_type()
            self.mode.__enter__()

    def close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
            self.windows.append(dict(self.current))
            self.current = collections.Counter()


def _counted_run(overrides: list[str], config: str = "tiny_cpu.yaml") -> tuple[list[dict], object]:
    """Train ``config`` (stage 2, or ProCLIP stage 1) under ``overrides`` with every step's window counted; the
    windows and the task."""
    from llm2clip_scale.config import load_config
    from llm2clip_scale.train import build_task
    from llm2clip_scale.train.loop import run

    counter = SyncCounter()
    cfg = load_config(REPO / "configs" / config, overrides)

    class Counted(type(build_task(cfg.train.stage))):
        def step(self, micro_batches: list[dict]):  # noqa: ANN202
            counter.open()
            return super().step(micro_batches)

        def batches(self):  # noqa: ANN202
            inner = super().batches()
            while True:
                counter.close()  # before the fetch: the loader is not part of the step
                yield next(inner)

    task = Counted()
    run(cfg, task)
    counter.close()  # the last step's window holds the final save: not a steady step, dropped below
    return counter.windows[:-1], task


def summarise(window: dict) -> dict[tuple[str, str], int]:
    totals: collections.Counter = collections.Counter()
    for (kind, owner, _), count in window.items():
        totals[(kind, owner)] += count
    return dict(totals)


def _ours(window: dict) -> dict[tuple[str, str], int]:
    return {key: value for key, value in summarise(window).items() if key[1] in ("ours", "other")}


# ------------------------------------------------------------------------------------------ the ranks' work


def _bucketing_check(task) -> dict:  # noqa: ANN001
    """Embed a 32-caption micro-batch per rank (the TP group's union: 64 captions of mixed fields) bucketed and as one
    padded batch; the vectors and the token positions each computed."""
    import torch.distributed
    from megatron.core import parallel_state

    from llm2clip_scale.data.loader import build_train_loader
    from llm2clip_scale.models.llm import embed

    cfg, topo = task.cfg, task.topo
    loader = build_train_loader(cfg.data, cfg.model.llm.tokenizer, cfg.model.vision.image_size, 32, topo.rank,
                                topo.world_size, cfg.train.seed + 1, cfg.data.max_text_len,
                                caption_format=cfg.model.llm.caption_format)
    batch = next(iter(loader))
    tower = task.step_fn.text_tower
    positions: list[int] = []
    forward = tower.forward

    def counting_forward(input_ids, *args, **kwargs):  # noqa: ANN001, ANN202
        positions.append(input_ids.numel())
        return forward(input_ids, *args, **kwargs)

    tower.forward = counting_forward
    group = parallel_state.get_tensor_model_parallel_group()
    args = (tower, batch["input_ids"], batch["attention_mask"], group)
    bucketed = embed.embed_local_batch(*args, pool_mask=batch["pool_mask"])
    bucketed_positions, positions[:] = sum(positions), []
    # A fixed micro-batch size turns bucketing off: the whole union in one batch, padded to its longest caption.
    reference = embed.embed_local_batch(*args, micro_batch_size=10**6, pool_mask=batch["pool_mask"])
    tower.forward = forward
    real_tokens = batch["attention_mask"].sum()
    torch.distributed.all_reduce(real_tokens, group=group)  # the union's, as the positions are
    return {"bucketed": bucketed, "reference": reference, "bucketed_positions": bucketed_positions,
            "reference_positions": sum(positions), "real_tokens": int(real_tokens)}


def _equal_rows_gradients() -> dict:
    """clip_loss and siglip_loss with the row counts exchanged and declared equal: values and gradients identical."""
    import torch.distributed as dist

    from llm2clip_scale.distributed.collectives import equal_row_counts
    from llm2clip_scale.losses import clip_loss, siglip_loss

    gen = torch.Generator().manual_seed(dist.get_rank())
    image = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    out = {}
    for name, loss_fn in (("infonce", lambda i, t: clip_loss(i, t, torch.tensor(10.0))),
                          ("siglip", lambda i, t: siglip_loss(i, t, torch.tensor(10.0), torch.tensor(-5.0)))):
        for equal in (False, True):
            i, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
            with equal_row_counts() if equal else contextlib.nullcontext():
                loss = loss_fn(i, t)
                loss.backward()
            out[(name, equal)] = (loss.detach(), i.grad, t.grad)
    return out


def _rank(data: Path, sidecars: Path | None, run_dir: Path, steps: int, checks: bool = True,
          reference_clip: Path | None = None) -> dict:
    import os

    world = int(os.environ["WORLD_SIZE"])  # micro-batches of 8 on every rank, whatever the world
    offline = [
        *tiny_overrides(data, run_dir / "offline", steps, "data.eval_shards=null", "train.resume=none",
                        f"train.global_batch={8 * world * ACCUMULATION}"),
        f"data.train_embedding_shards={sidecars}/train-{{000000..000003}}.tar", "model.llm.tokenizer=''",
    ]
    online = tiny_overrides(data, run_dir / "online", steps, "data.eval_shards=null", "train.resume=none",
                            f"train.global_batch={8 * world}",
                            "parallel.tensor_parallel=2", "parallel.zero_stage=2", "train.loss=siglip",
                            "model.logit_bias_init=-10")
    result: dict = {}
    if reference_clip is not None:  # ProCLIP stage 1, the official two views, 2 micro-batches a step
        proclip = [*tiny_overrides(data, run_dir / "proclip", steps, "data.eval_shards=null", "train.resume=none",
                                   f"train.global_batch={8 * world * ACCUMULATION}"),
                   f"proclip.teacher_text={reference_clip}/text", "proclip.views=[short,raw]",
                   "proclip.structure_views=[short]", "data.num_workers=0"]
        result["proclip"], _ = _counted_run(proclip, "proclip_inherit_tiny.yaml")
    if sidecars is not None:
        result["offline"], _ = _counted_run(offline)
    result["online_tp2"], task = _counted_run(online)
    if checks:  # the tests' checks; the table (which also counts older trees) only counts
        result["bucketing"] = _bucketing_check(task)
        result["equal_rows"] = _equal_rows_gradients()
    return result


# ------------------------------------------------------------------------------------------ tests


STEPS = 4  # windows of steps 1..3 (the last step's holds the final save); step 1 is a log line, 2 and 3 are not


@pytest.fixture(scope="module")
def counted(tiny_data: Path, tiny_sidecars: Path, tiny_reference_clip: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_on_ranks(_rank, 2, tiny_data, tiny_sidecars, tmp_path_factory.mktemp("syncs"), STEPS, True,
                        tiny_reference_clip)[0]


@pytest.mark.parametrize("variant, micro_batches", [("offline", ACCUMULATION), ("online_tp2", 1),
                                                    ("proclip", ACCUMULATION)])
def test_a_step_needs_one_read_and_its_collectives(counted: dict, variant: str, micro_batches: int) -> None:
    windows = counted[variant]
    assert len(windows) == STEPS - 1
    expected = budget(variant, micro_batches, world=2)
    for step, window in enumerate(windows, start=1):
        wanted = {key: expected[key] + (LOG_LINE_EXTRA[key] if step == 1 else 0) for key in expected}
        assert _ours(window) == wanted, f"step {step}: " + "; ".join(
            f"{count} x {kind} {where}" for (kind, owner, where), count in sorted(window.items()) if owner == "ours")


def test_zero_and_tensor_parallel_syncs_are_the_libraries_per_step_own(counted: dict) -> None:
    # Not ours to budget, but charged right and not growing: DeepSpeed's ZeRO (per parameter group: a norm all-reduce,
    # a host read, a parameter all-gather) repeats exactly from step to step; megatron's TP all-reduces come whole
    # tower passes at a time (the embedding's and 2 per layer of the 2-layer tower), one pass per length bucket.
    for variant in ("offline", "online_tp2"):
        steady = [summarise(window) for window in counted[variant][1:]]
        zero = [{k: v for k, v in s.items() if k[1] == "zero"} for s in steady]
        assert zero[0] == zero[-1] and zero[0][("collective", "zero")] > 0
        assert all(s.get(("read", "llm_tp"), 0) == s.get(("collective", "other"), 0) == 0 for s in steady)
    assert all(s[("collective", "llm_tp")] % 5 == 0 for s in map(summarise, counted["online_tp2"]))


def test_bucketed_captions_embed_as_one_padded_batch_with_fewer_positions(counted: dict) -> None:
    check = counted["bucketing"]
    bucketed, reference = check["bucketed"], check["reference"]
    assert bucketed.shape == reference.shape == (32, 128)
    relative = (bucketed - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(relative.max()) <= 1e-5
    assert check["real_tokens"] <= check["bucketed_positions"] < check["reference_positions"]


def test_declared_equal_rows_give_the_exchanged_rows_values_and_gradients(counted: dict) -> None:
    for name in ("infonce", "siglip"):
        exchanged, declared = counted["equal_rows"][(name, False)], counted["equal_rows"][(name, True)]
        assert all(torch.equal(a, b) for a, b in zip(exchanged, declared)), name


def test_length_buckets_are_the_cheapest_cut_of_the_sorted_rows() -> None:
    from llm2clip_scale.models.llm.embed import length_buckets

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        overhead = [0, 5, 30, 1000][trial % 4]
        order, sizes = length_buckets(lengths, overhead)
        assert sorted(order) == list(range(len(lengths))) and sum(sizes) == len(lengths)
        ordered = [lengths[row] for row in order]
        assert ordered == sorted(lengths, reverse=True)

        cuts = [[b - a for a, b in zip((0, *inner), (*inner, len(lengths)))]  # every composition of the rows
                for k in range(len(lengths)) for inner in itertools.combinations(range(1, len(lengths)), k)]
        costs = [_cut_cost(cut, ordered, overhead) for cut in cuts]
        assert _cut_cost(sizes, ordered, overhead) == min(costs), (lengths, overhead, sizes)


def _cut_cost(cut: list[int], ordered: list[int], overhead: int) -> int:
    """Positions computed for rows sorted longest first, cut into chunks of ``cut`` rows, plus overhead per chunk."""
    starts = itertools.accumulate([0, *cut[:-1]])
    return sum(size * ordered[start] + overhead for start, size in zip(starts, cut))


# ------------------------------------------------------------------------------------------ the table


def _table(world: int, steps: int) -> str:
    import datetime
    import platform
    import sys
    import tempfile

    from llm2clip_scale.data.synthetic import SyntheticParams, build_synthetic_dataset
    from tests.conftest import _embed_sidecars

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_synthetic_dataset(data, SyntheticParams(train_samples=256, eval_samples=32, image_size=32,
                                                      samples_per_shard=64, seed=1))
        run_on_ranks(_embed_sidecars, 1, data, Path(tmp) / "sidecars")
        result = run_on_ranks(_rank, world, data, Path(tmp) / "sidecars", Path(tmp) / "runs", steps, False,
                              timeout=1800)[0]
    lines = [f"host syncs per stage-2 step: {world} gloo ranks, {platform.node()} ({platform.processor() or 'cpu'}), "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}, code at {Path.cwd()}",
             f"command: python -m tests.test_step_syncs {' '.join(sys.argv[1:])}", "",
             "| run | step | ours: collectives | ours: reads | ZeRO: collectives | ZeRO: reads | LLM TP: collectives "
             "| CPU AdamW: reads |", "|---|---|---|---|---|---|---|---|"]
    for variant in ("offline", "online_tp2"):
        for step, window in enumerate(result[variant], start=1):
            s = summarise(window)
            lines.append(f"| {variant} | {step} | {s.get(('collective', 'ours'), 0)} | {s.get(('read', 'ours'), 0)} "
                         f"| {s.get(('collective', 'zero'), 0)} | {s.get(('read', 'zero'), 0)} "
                         f"| {s.get(('collective', 'llm_tp'), 0)} | {s.get(('read', 'optimizer'), 0)} |")
    lines.append("")
    for variant in ("offline", "online_tp2"):
        lines.append(f"{variant}, step 2, where:")
        lines += [f"  {count:4d} {kind:10s} {owner:9s} {where}"
                  for (kind, owner, where), count in sorted(result[variant][1].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS)
    options = parser.parse_args()
    print(_table(options.world, options.steps))
