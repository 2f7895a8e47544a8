"""Classification metrics from logits (the currency of CV and ensembling)."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.metrics import accuracy_score, f1_score


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def score(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and log loss (= mean cross-entropy) of logits against integer labels."""
    n_classes = logits.shape[1]
    pred = logits.argmax(1)
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=np.arange(n_classes), zero_division=0)),
            "log_loss": float(-logp[np.arange(len(y)), y].mean())}


def score_probabilities(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """score() of probabilities (a blend or a fold average), clipped away from 0 before the log."""
    return score(y, np.log(np.clip(probs, 1e-12, 1.0)))
