"""EMA teacher of the image encoder for ProCLIP's self-distillation (keeps stage 2 near the pretrained alignment)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class EMATeacher:
    """A frozen fp32 copy of ``module`` that trails it: teacher <- m * teacher + (1 - m) * student after each step.

    Kept outside the DeepSpeed engine on purpose: it has no gradients or optimizer state, and ZeRO stages 0-2 leave
    the student's full parameters on every rank, so every rank updates an identical teacher without communication.
    """

    def __init__(self, module: nn.Module, momentum: float, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.teacher = copy.deepcopy(module).float().requires_grad_(False).eval().to(device)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for teacher_param, student_param in zip(self.teacher.parameters(), student.parameters(), strict=True):
            teacher_param.lerp_(student_param.detach().float(), 1.0 - self.momentum)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.teacher(images.float()), dim=-1)
