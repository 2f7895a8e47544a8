"""The metrics comp scores single-label predictions with, in one place: each one's name, direction and what it
scores (predicted labels or probabilities); logits are the currency of CV and ensembling."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class)."""
    return np.bincount(np.asarray(y) * n_classes + np.asarray(pred), minlength=n_classes**2).reshape(n_classes, n_classes)


def accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(cm.sum(), 1))


def macro_f1(cm: np.ndarray) -> float:
    """F1 of every class (0 for a class never true nor predicted), averaged."""
    tp, denom = np.diag(cm).astype(np.float64), (cm.sum(0) + cm.sum(1)).astype(np.float64)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def qwk(cm: np.ndarray) -> float:
    """Quadratic weighted kappa, the classes in their sorted order (ordinal ratings)."""
    k = len(cm)
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(1), cm.sum(0)) / max(cm.sum(), 1)
    denom = (w * expected).sum()
    return float(1 - (w * cm).sum() / denom) if denom > 0 else 0.0


LABEL_METRICS = {"macro_f1": macro_f1, "accuracy": accuracy, "qwk": qwk}  # scored on predicted labels: higher wins
NAMES = (*LABEL_METRICS, "log_loss")                                       # log_loss: on probabilities, lower wins
DIRECTION = {**{name: "max" for name in LABEL_METRICS}, "log_loss": "min"}


def validation_row(scores: dict[str, float]) -> dict[str, float]:
    """An epoch's label metrics as its history row spells them (val_macro_f1, ...): what train.monitor names."""
    return {f"val_{name}": scores[name] for name in LABEL_METRICS}


def line(scores: dict[str, float], metric: str) -> str:
    """The scores as one line, the competition's metric first: "qwk 0.7512  macro_f1 0.4534  ..."."""
    names = [metric] + [n for n in ("macro_f1", "accuracy", "log_loss") if n != metric]
    return "  ".join(f"{n} {scores[n]:.4f}" for n in names)


def score_labels(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    cm = confusion(y, pred, n_classes)
    return {name: fn(cm) for name, fn in LABEL_METRICS.items()}


def score(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Every metric of logits against integer labels: the label metrics of the argmax, and the log loss (= mean
    cross-entropy)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return {**score_labels(y, logits.argmax(1), logits.shape[1]), "log_loss": float(-logp[np.arange(len(y)), y].mean())}


def score_probabilities(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """score() of probabilities (a blend or a fold average), clipped away from 0 before the log."""
    return score(y, np.log(np.clip(probs, 1e-12, 1.0)))
