"""Decision rules fitted honestly (`--decide`): how to turn predicted probabilities into labels so that the
competition's label metric (data.metric) beats a plain argmax.

- macro-F1 and accuracy: per-class weights on the probabilities (argmax of weight × probability);
- QWK (ordinal ratings): cut points on the expected rating Σ k·p_k (the "optimized rounder").

Both are fitted by coordinate ascent. The rule's CV is cross-fitted: fold k's rows are decided by a rule
fitted on the other folds' OOF rows only; the rule fitted on every OOF row decides the test rows."""

from __future__ import annotations

import numpy as np

from comp import metrics
from comp.config import Config
from comp.errors import CompError
from comp.outputs import leaderboard, takes_probabilities
from comp.tables import Competition

GRID = np.exp(np.linspace(-1.5, 1.5, 31))  # a class's weight relative to the first class's (which stays 1)
STEPS = 21                                 # candidate positions of a cut between its neighbours
ROUNDS = 2


def labels_of(probs: np.ndarray, rule: dict) -> np.ndarray:
    """The class each row gets under the rule."""
    if rule["kind"] == "cuts":
        return np.searchsorted(np.asarray(rule["cuts"]), probs @ np.arange(probs.shape[1]), side="right")
    return (np.log(np.clip(probs, 1e-12, 1.0)) + np.log(np.asarray(rule["weights"]))).argmax(1)


def decided(probs: np.ndarray, rule: dict) -> np.ndarray:
    """One-hot rows of the rule's labels: what a label submission writes (its argmax)."""
    return np.eye(probs.shape[1])[labels_of(probs, rule)]


def fit(y: np.ndarray, probs: np.ndarray, metric: str) -> dict:
    """The rule for the metric, by coordinate ascent from a plain argmax (weights) or from rounding the expected
    class (cuts); a value moves only when the metric strictly improves."""
    k, fn = probs.shape[1], metrics.LABEL_METRICS[metric]
    kind = "cuts" if metric == "qwk" else "weights"
    values = np.arange(k - 1) + 0.5 if kind == "cuts" else np.ones(k)

    def value(v: np.ndarray) -> float:
        return fn(metrics.confusion(y, labels_of(probs, {"kind": kind, kind: v}), k))

    best = value(values)
    for _ in range(ROUNDS):
        for i in range(len(values)) if kind == "cuts" else range(1, k):
            for candidate in _candidates(values, i, kind):
                trial = values.copy()
                trial[i] = candidate
                v = value(trial)
                if v > best + 1e-12:
                    best, values = v, trial
    return {"kind": kind, kind: values.tolist()}


def _candidates(values: np.ndarray, i: int, kind: str) -> np.ndarray:
    if kind == "weights":
        return GRID
    low = values[i - 1] if i > 0 else values[i] - 1.0
    high = values[i + 1] if i + 1 < len(values) else values[i] + 1.0
    return np.linspace(low, high, STEPS)[1:-1]  # cuts stay in order


def cross_fit(y: np.ndarray, folds: np.ndarray, probs: np.ndarray, metric: str) -> tuple[np.ndarray, list[dict]]:
    """OOF labels where fold k's rows are decided by a rule fitted on the other folds' rows; each fold's rule."""
    labels, rules = np.zeros(len(y), np.int64), []
    for k in np.unique(folds):
        own = folds == k
        rule = fit(y[~own], probs[~own], metric)
        labels[own] = labels_of(probs[own], rule)
        rules.append(rule)
    return labels, rules


def decide(metric: str, y: np.ndarray, folds: np.ndarray, oof_probs: np.ndarray) -> dict:
    """The rule for data.metric fitted on every OOF row, with the CV before and after (cross-fitted)."""
    if metric not in metrics.LABEL_METRICS:
        raise CompError(f"--decide picks labels, and data.metric = {metric!r} scores probabilities: set data.metric "
                        f"to one of {', '.join(metrics.LABEL_METRICS)}, or drop --decide")
    k = oof_probs.shape[1]
    labels, rules = cross_fit(y, folds, oof_probs, metric)
    return {**fit(y, oof_probs, metric), "metric": metric,
            "cv_before": metrics.score_labels(y, oof_probs.argmax(1), k)[metric],
            "cv_after": metrics.score_labels(y, labels, k)[metric], "fold_rules": rules}


def for_submission(cfg: Config, comp: Competition, folds: np.ndarray, oof_probs: np.ndarray, test_probs: np.ndarray,
                   console) -> tuple[np.ndarray, dict]:
    """The rule for the competition's metric (printed), and the test rows it decides (one-hot); with hidden
    answers (data.solution) the rule also records its leaderboard score."""
    if cfg.data.task != metrics.SINGLE:
        raise CompError(f"--decide fits rules for data.task = \"single_label\" only (this one is {cfg.data.task!r}): "
                        "drop --decide")
    if takes_probabilities(cfg, comp):
        raise CompError("--decide picks labels, and this submission holds a probability per class (see "
                        "data.sample_submission): drop --decide")
    rule = decide(cfg.data.metric, comp.y, folds, oof_probs)
    console.print(describe(rule, comp.classes), highlight=False)
    probs = decided(test_probs, rule)
    if cfg.data.solution:
        rule["leaderboard_after"] = leaderboard(cfg, comp, probs)[rule["metric"]]
    return probs, rule


def describe(rule: dict, classes: list[str]) -> str:
    if rule["kind"] == "cuts":
        what = "cuts on the expected class " + ", ".join(f"{c:.2f}" for c in rule["cuts"])
    else:
        what = "weights " + ", ".join(f"{c} {w:.2f}" for c, w in zip(classes, rule["weights"], strict=True))
    return (f"decide: CV {rule['metric']} {rule['cv_before']:.4f} -> {rule['cv_after']:.4f} (each fold decided by a "
            f"rule fitted on the other folds); {what}")
