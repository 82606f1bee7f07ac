"""The EMA teacher's rule on plain modules: teacher <- m * teacher + (1 - m) * student per update, from an fp32 copy
of the student that shares nothing with it. References are computed in float64 and rounded once; torch's lerp differs
from them by rounding only (~1 ulp of the operands), so fp32 comparisons use rtol 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm2clip_scale.train.ema import EMATeacher


def _module(seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(dtype)


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_update_is_momentum_times_teacher_plus_rest_times_student() -> None:
    # m = 0.9, not 0.5: a swap of m and 1 - m must show.
    momentum = 0.9
    student = _module(0)
    ema = EMATeacher(student, momentum)
    teacher = _params(student)  # the teacher starts as an exact copy
    for got, want in zip(ema.teacher.parameters(), teacher, strict=True):
        assert torch.equal(got, want)
    for seed in (1, 2, 3):  # the student moves between updates; each update folds in its current weights once
        student.load_state_dict(_module(seed).state_dict())
        ema.update(student)
        teacher = [(momentum * t.double() + (1 - momentum) * s.double()).float()
                   for t, s in zip(teacher, student.parameters(), strict=True)]
        for got, want in zip(ema.teacher.parameters(), teacher, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # The updates are large against the tolerance (the comparisons above are not vacuous): the teacher is far from
    # where it started.
    start = _params(_module(0))
    assert max(float((t - s).abs().max()) for t, s in zip(ema.teacher.parameters(), start, strict=True)) > 0.05


def test_teacher_is_a_frozen_fp32_copy_independent_of_the_student() -> None:
    student = _module(0, torch.bfloat16)
    ema = EMATeacher(student, 0.5)
    for got, want in zip(ema.teacher.parameters(), student.parameters(), strict=True):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want.float())  # bf16 -> fp32 is exact
    assert not ema.teacher.training
    # Training the student in place does not reach the teacher until update() is called.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for got, want in zip(ema.teacher.parameters(), _module(0, torch.bfloat16).parameters(), strict=True):
        assert torch.equal(got, want.float())
    # A bf16 student is read in fp32: 0.5 * t + 0.5 * s with t, s bf16 values is exact in fp32.
    ema.update(student)
    for got, t, s in zip(ema.teacher.parameters(), _module(0, torch.bfloat16).parameters(), student.parameters(),
                         strict=True):
        assert torch.equal(got, 0.5 * t.float() + 0.5 * s.float())


def test_momentum_zero_copies_the_student_and_features_are_normalised() -> None:
    student = _module(0)
    ema = EMATeacher(student, 0.0)
    student.load_state_dict(_module(1).state_dict())
    ema.update(student)
    for got, want in zip(ema.teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(got, want)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), F.normalize(student(x), dim=-1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_momentum_outside_the_unit_interval_is_refused(momentum: float) -> None:
    with pytest.raises(ValueError, match="EMA momentum"):
        EMATeacher(_module(0), momentum)
