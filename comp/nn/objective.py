"""What training minimises, by task: cross-entropy (plain, class-weighted) or focal loss of the class
(single_label) or of each label (multi_label: binary, the positives weighted by balanced_ce); the squared error
of the standardized targets (regression); and the same objective on the validation rows for early stopping."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from comp import metrics
from comp.config import TrainConfig
from comp.nn.batching import Rows
from comp.nn.model import target_moments


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)**gamma: easy rows count less (gamma 0 is plain cross-entropy)."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - logp.exp()).pow(self.gamma) * logp).mean()


class BinaryLoss(nn.Module):
    """Binary cross-entropy of every label's logit, its positives weighted by pos_weight (balanced_ce) or scaled
    by (1 - p_true)**gamma (focal), averaged over rows and labels."""

    def __init__(self, pos_weight: torch.Tensor | None = None, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight, reduction="none")
        if self.gamma:
            p = torch.sigmoid(logits)
            loss = loss * (1 - (p * target + (1 - p) * (1 - target))).pow(self.gamma)
        return loss.mean()


class StandardizedMSE(nn.Module):
    """Squared error in units of each target's standard deviation over the training rows (the model's outputs
    are in the targets' own units), averaged over rows and targets."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (((values.float() - target) / self.scale) ** 2).mean()


class Distilled(nn.Module):
    """train.teacher: (1 - weight) · the task's loss on the labels + weight · a loss on the teacher's outputs for
    the same rows: the KL divergence of the softened class distributions (single_label), the binary
    cross-entropy to the teacher's softened label probabilities (multi_label), both scaled by T² as in Hinton et
    al., or the task's squared error to the teacher's values (regression). Rows without teacher outputs (the
    validation rows) get the task's loss alone."""

    def __init__(self, base: nn.Module, weight: float, temperature: float, task: str):
        super().__init__()
        self.base, self.weight, self.temperature, self.task = base, weight, temperature, task

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.base(logits, target)
        if teacher is None:
            return loss
        t, logits, teacher = self.temperature, logits.float(), teacher.float()
        if self.task == metrics.SINGLE:
            soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="batchmean") * t * t
        elif self.task == metrics.MULTI:
            soft = F.binary_cross_entropy_with_logits(logits / t, torch.sigmoid(teacher / t)) * t * t
        else:
            soft = self.base(logits, teacher)
        return (1 - self.weight) * loss + self.weight * soft


def class_weights(tcfg: TrainConfig, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """balanced_ce's weight of each class over the fold's training rows (metrics.balanced_weights); None for
    unweighted losses and for the tasks without classes."""
    if tcfg.loss != "balanced_ce" or y.ndim != 1:
        return None
    return metrics.balanced_weights(y, n_classes)


def row_weights(tcfg: TrainConfig, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """Each training row's weight in the loss's mean (its class's weight); None when every row counts 1."""
    weight = class_weights(tcfg, y, n_classes)
    return None if weight is None else weight[y]


def make_loss(tcfg: TrainConfig, y: np.ndarray, n_classes: int, device: torch.device) -> nn.Module:
    """train.loss: ce, balanced_ce (class_weights) or focal; each the (weighted) mean over a batch's rows;
    mse for regression; multi_label (a 0/1 matrix y) takes the binary forms."""
    if tcfg.loss == "mse":
        return StandardizedMSE(torch.as_tensor(target_moments(y)[1], device=device))
    if y.ndim == 2:
        positives = y.sum(0)
        pos_weight = (len(y) - positives) / np.maximum(positives, 1)
        return BinaryLoss(torch.as_tensor(pos_weight, dtype=torch.float32, device=device)
                          if tcfg.loss == "balanced_ce" else None, tcfg.focal_gamma if tcfg.loss == "focal" else 0.0)
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
        return scores["log_loss"]  # the mean (binary) cross-entropy
    with torch.no_grad():
        device = next(iter(loss_fn.buffers()), torch.zeros(0)).device
        value = loss_fn(torch.from_numpy(logits).to(device), torch.from_numpy(rows.y).to(device))
    return float(value)
