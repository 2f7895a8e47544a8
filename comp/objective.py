"""What training minimises: cross-entropy (plain, class-weighted) or focal loss, and the same objective on
the validation rows for early stopping."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from comp.batching import Rows
from comp.config import TrainConfig


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)**gamma: easy rows count less (gamma 0 is plain cross-entropy)."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - logp.exp()).pow(self.gamma) * logp).mean()


def class_weights(tcfg: TrainConfig, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """balanced_ce's weight of each class, n / (k · count) over the fold's training rows (0 for a class it
    lacks); None for unweighted losses."""
    if tcfg.loss != "balanced_ce":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def row_weights(tcfg: TrainConfig, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """Each training row's weight in the loss's mean (its class's weight); None when every row counts 1."""
    weight = class_weights(tcfg, y, n_classes)
    return None if weight is None else weight[y]


def make_loss(tcfg: TrainConfig, y: np.ndarray, n_classes: int, device: torch.device) -> nn.Module:
    """train.loss: ce, balanced_ce (class_weights) or focal; each the (weighted) mean over a batch's rows."""
    if tcfg.loss == "focal":
        return FocalLoss(tcfg.focal_gamma)
    weight = class_weights(tcfg, y, n_classes)
    if weight is not None:
        return nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32, device=device))
    return nn.CrossEntropyLoss()


def validation_loss(tcfg: TrainConfig, loss_fn: nn.Module, rows: Rows, logits: np.ndarray, scores: dict) -> float:
    """The training objective on the validation rows: the plain log loss for "ce", else the configured loss
    (class-weighted or focal), so that early stopping selects by what training optimises."""
    if tcfg.loss == "ce":
        return scores["log_loss"]
    with torch.no_grad():
        device = next(iter(loss_fn.buffers()), torch.zeros(0)).device
        value = loss_fn(torch.from_numpy(logits).to(device), torch.from_numpy(rows.y).to(device))
    return float(value)
