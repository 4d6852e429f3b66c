"""The training losses, by the name `train.loss` gives them: Charbonnier (smooth L1) and L1."""

from __future__ import annotations

import torch

CHARBONNIER_EPS = 1e-3  # as in MPRNet / Restormer training recipes


def charbonnier_loss(
    output: torch.Tensor, target: torch.Tensor, eps: float = CHARBONNIER_EPS
) -> torch.Tensor:
    """mean(sqrt((output - target)^2 + eps^2)): L1 that is smooth at zero."""
    return torch.sqrt((output - target).square() + eps * eps).mean()


def l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).abs().mean()


LOSSES = {"charbonnier": charbonnier_loss, "l1": l1_loss}
