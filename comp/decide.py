"""Decision rules fitted honestly (`--decide`): per-class weights on the predicted probabilities, chosen to raise
the competition's label metric (data.metric: macro-F1, accuracy or QWK) over a plain argmax. The rule's CV is
cross-fitted: fold k's rows are decided by weights fitted on the other folds' OOF rows only; the weights fitted
on every OOF row decide the test rows."""

from __future__ import annotations

import numpy as np

from comp import metrics
from comp.config import Config
from comp.errors import CompError
from comp.outputs import takes_probabilities
from comp.tables import Competition

GRID = np.exp(np.linspace(-1.5, 1.5, 31))  # a class's weight relative to the first class's (which stays 1)
ROUNDS = 2


def decided(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The probabilities reweighted by class and renormalised: their argmax is the rule's label."""
    p = probs * weights
    return p / p.sum(1, keepdims=True)


def fit(y: np.ndarray, probs: np.ndarray, metric: str) -> np.ndarray:
    """Per-class weights by coordinate ascent over GRID (ROUNDS passes), starting from argmax (all 1); a weight
    moves only when the metric strictly improves."""
    k, fn = probs.shape[1], metrics.LABEL_METRICS[metric]
    logp = np.log(np.clip(probs, 1e-12, 1.0))
    weights = np.ones(k)

    def value(w: np.ndarray) -> float:
        return fn(metrics.confusion(y, (logp + np.log(w)).argmax(1), k))

    best = value(weights)
    for _ in range(ROUNDS):
        for c in range(1, k):
            for g in GRID:
                trial = weights.copy()
                trial[c] = g
                v = value(trial)
                if v > best + 1e-12:
                    best, weights = v, trial
    return weights


def cross_fit(y: np.ndarray, folds: np.ndarray, probs: np.ndarray, metric: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """OOF labels where fold k's rows are decided by weights fitted on the other folds' rows; each fold's weights."""
    labels, per_fold = np.zeros(len(y), np.int64), []
    for k in np.unique(folds):
        own = folds == k
        w = fit(y[~own], probs[~own], metric)
        labels[own] = decided(probs[own], w).argmax(1)
        per_fold.append(w)
    return labels, per_fold


def decide(metric: str, y: np.ndarray, folds: np.ndarray, oof_probs: np.ndarray) -> dict:
    """The rule for data.metric: its weights fitted on every OOF row, and the CV before and after (cross-fitted)."""
    if metric not in metrics.LABEL_METRICS:
        raise CompError(f"--decide picks labels, and data.metric = {metric!r} scores probabilities: set data.metric "
                        f"to one of {', '.join(metrics.LABEL_METRICS)}, or drop --decide")
    k = oof_probs.shape[1]
    labels, per_fold = cross_fit(y, folds, oof_probs, metric)
    return {"metric": metric, "weights": fit(y, oof_probs, metric).tolist(),
            "cv_before": metrics.score_labels(y, oof_probs.argmax(1), k)[metric],
            "cv_after": metrics.score_labels(y, labels, k)[metric],
            "fold_weights": [w.tolist() for w in per_fold]}


def for_submission(cfg: Config, comp: Competition, folds: np.ndarray, oof_probs: np.ndarray, test_probs: np.ndarray,
                   console) -> tuple[np.ndarray, dict]:
    """The rule for the competition's metric (printed), and the test probabilities it decides."""
    if takes_probabilities(cfg, comp):
        raise CompError("--decide picks labels, and this submission holds a probability per class (see "
                        "data.sample_submission): drop --decide")
    rule = decide(cfg.data.metric, comp.y, folds, oof_probs)
    console.print(describe(rule, comp.classes), highlight=False)
    return decided(test_probs, np.array(rule["weights"])), rule


def describe(rule: dict, classes: list[str]) -> str:
    return (f"decide: CV {rule['metric']} {rule['cv_before']:.4f} -> {rule['cv_after']:.4f} (each fold decided by "
            f"weights fitted on the other folds); weights " + ", ".join(
                f"{c} {w:.2f}" for c, w in zip(classes, rule["weights"], strict=True)))
