"""Decision rules fitted honestly (`--decide`): how to turn predicted probabilities into labels so that the
competition's label metric (data.metric) beats a plain argmax.

- macro-F1 and accuracy: per-class weights on the probabilities (argmax of weight × probability);
- QWK (ordinal ratings): cut points on the expected rating Σ k·p_k, or on a regression's value (the
  "optimized rounder"; the levels are the values the training targets show);
- multi-label macro-F1: a probability threshold per label (each label's F1 is its own, so each is fitted alone).

Weights and cuts are fitted by coordinate ascent. The rule's CV is cross-fitted: fold k's rows are decided by a rule
fitted on the other folds' OOF rows only; the rule fitted on every OOF row decides the test rows."""

from __future__ import annotations

import numpy as np

from comp import metrics
from comp.config import Config
from comp.errors import CompError
from comp.outputs.collect import leaderboard, takes_probabilities
from comp.tables.read import Competition

GRID = np.exp(np.linspace(-1.5, 1.5, 31))  # a class's weight relative to the first class's (which stays 1)
STEPS = 21                                 # candidate positions of a cut between its neighbours
ROUNDS = 2


THRESHOLDS = np.linspace(0.05, 0.95, 19)  # candidate thresholds of a label
RULE = ("kind", "weights", "cuts", "thresholds", "levels", "metric")  # what applying a rule needs


def portable(rule: dict) -> dict:
    """The parts of a rule that decide labels (what a bundle carries), without its CV figures."""
    return {k: rule[k] for k in RULE if k in rule}


def labels_of(probs: np.ndarray, rule: dict) -> np.ndarray:
    """The class (regression: level) each row gets under the rule (multi_label: each label's 0/1)."""
    if rule["kind"] == "thresholds":
        return (probs >= np.asarray(rule["thresholds"])).astype(np.int64)
    if rule["kind"] == "cuts":
        return np.searchsorted(np.asarray(rule["cuts"]), _position(probs, rule), side="right")
    return (np.log(np.clip(probs, 1e-12, 1.0)) + np.log(np.asarray(rule["weights"]))).argmax(1)


def _position(probs: np.ndarray, rule: dict) -> np.ndarray:
    """Where a row sits on the class scale 0 .. k-1: its expected class, or its value placed between the levels."""
    if "levels" in rule:
        levels = np.asarray(rule["levels"])
        return np.interp(probs[:, 0], levels, np.arange(len(levels)))
    return probs @ np.arange(probs.shape[1])


def decided(probs: np.ndarray, rule: dict) -> np.ndarray:
    """One-hot rows of the rule's labels: what a label submission writes (its argmax; multi_label: its 0/1s;
    regression: the levels themselves)."""
    labels = labels_of(probs, rule)
    if "levels" in rule:
        return np.asarray(rule["levels"], dtype=np.float64)[labels][:, None]
    return labels.astype(np.float64) if labels.ndim == 2 else np.eye(probs.shape[1])[labels]


def fit(y: np.ndarray, probs: np.ndarray, metric: str, task: str = metrics.SINGLE) -> dict:
    """The rule for the metric, by coordinate ascent from a plain argmax (weights) or from rounding the expected
    class (cuts); a value moves only when the metric strictly improves. Multi-label (a 0/1 matrix y): the
    threshold of each label that maximises its F1 (0.5 unless one does better)."""
    if task == metrics.MULTI:
        return {"kind": "thresholds", "thresholds": [_threshold(y[:, j], probs[:, j]) for j in range(y.shape[1])]}
    extra = {}
    if task == metrics.REGRESSION:  # cuts between the levels the targets show, on the class scale
        levels = np.unique(y[:, 0])
        y, extra = np.searchsorted(levels, y[:, 0]), {"levels": levels.tolist()}
    k, fn = len(extra.get("levels", ())) or probs.shape[1], metrics.LABEL_METRICS[metric]
    kind = "cuts" if metric == "qwk" else "weights"
    values = np.arange(k - 1) + 0.5 if kind == "cuts" else np.ones(k)

    def value(v: np.ndarray) -> float:
        return fn(metrics.confusion(y, labels_of(probs, {"kind": kind, kind: v, **extra}), k))

    best = value(values)
    for _ in range(ROUNDS):
        for i in range(len(values)) if kind == "cuts" else range(1, k):
            for candidate in _candidates(values, i, kind):
                trial = values.copy()
                trial[i] = candidate
                v = value(trial)
                if v > best + 1e-12:
                    best, values = v, trial
    return {"kind": kind, kind: values.tolist(), **extra}


def _threshold(y: np.ndarray, p: np.ndarray) -> float:
    def f1(t: float) -> float:
        tp, predicted = float((y * (p >= t)).sum()), float((p >= t).sum())
        return 2 * tp / (predicted + y.sum()) if predicted + y.sum() else 0.0

    best = 0.5
    for t in THRESHOLDS:
        if f1(t) > f1(best) + 1e-12:
            best = float(t)
    return best


def _candidates(values: np.ndarray, i: int, kind: str) -> np.ndarray:
    if kind == "weights":
        return GRID
    low = values[i - 1] if i > 0 else values[i] - 1.0
    high = values[i + 1] if i + 1 < len(values) else values[i] + 1.0
    return np.linspace(low, high, STEPS)[1:-1]  # cuts stay in order


def cross_fit(y: np.ndarray, folds: np.ndarray, probs: np.ndarray, metric: str,
              task: str = metrics.SINGLE) -> tuple[np.ndarray, list[dict]]:
    """OOF decisions (decided()) where fold k's rows are decided by a rule fitted on the other folds' rows;
    each fold's rule."""
    out, rules = None, []
    for k in np.unique(folds):
        own = folds == k
        rule = fit(y[~own], probs[~own], metric, task)
        part = decided(probs[own], rule)
        out = np.zeros((len(y), part.shape[1])) if out is None else out
        out[own] = part
        rules.append(rule)
    return out, rules


def decide(metric: str, y: np.ndarray, folds: np.ndarray, oof_probs: np.ndarray, task: str = metrics.SINGLE) -> dict:
    """The rule for data.metric fitted on every OOF row, with the CV before and after (cross-fitted)."""
    if metrics.REGISTRY[metric].on != "labels":
        raise CompError(f"--decide picks labels, and data.metric = {metric!r} scores probabilities: set data.metric "
                        f"to a metric of labels ({', '.join(metrics.LABEL_METRICS)}), or drop --decide")
    after, rules = cross_fit(y, folds, oof_probs, metric, task)
    score = metrics.REGISTRY[metric].fn
    return {**fit(y, oof_probs, metric, task), "metric": metric, "cv_before": score(y, oof_probs),
            "cv_after": score(y, after), "fold_rules": rules}


def for_submission(cfg: Config, comp: Competition, folds: np.ndarray, oof_probs: np.ndarray, test_probs: np.ndarray,
                   console) -> tuple[np.ndarray, dict]:
    """The rule for the competition's metric (printed), and the test rows it decides (one-hot); with hidden
    answers (data.solution) the rule also records its leaderboard score."""
    if cfg.data.task == metrics.REGRESSION and (cfg.data.metric != "qwk" or len(comp.classes) != 1):
        raise CompError("--decide on a regression fits QWK cut points on one target: set data.metric = \"qwk\" "
                        "(ordinal levels such as ratings), or drop --decide")
    if takes_probabilities(cfg, comp) and cfg.data.task == metrics.SINGLE:
        raise CompError("--decide picks labels, and this submission holds a probability per class (see "
                        "data.sample_submission): drop --decide")
    rule = decide(cfg.data.metric, comp.y, folds, oof_probs, cfg.data.task)
    console.print(describe(rule, comp.classes), highlight=False)
    probs = decided(test_probs, rule)
    if cfg.data.solution:
        rule["leaderboard_after"] = leaderboard(cfg, comp, probs)[rule["metric"]]
    return probs, rule


def describe(rule: dict, classes: list[str]) -> str:
    if rule["kind"] == "thresholds":
        what = "thresholds " + ", ".join(f"{c} {t:.2f}" for c, t in zip(classes, rule["thresholds"], strict=True))
    elif rule["kind"] == "cuts":
        scale = "the value, levels " + ", ".join(f"{v:g}" for v in rule["levels"]) if "levels" in rule else "the expected class"
        what = f"cuts on {scale}: " + ", ".join(f"{c:.2f}" for c in rule["cuts"])
    else:
        what = "weights " + ", ".join(f"{c} {w:.2f}" for c, w in zip(classes, rule["weights"], strict=True))
    return (f"decide: CV {rule['metric']} {rule['cv_before']:.4f} -> {rule['cv_after']:.4f} (each fold decided by a "
            f"rule fitted on the other folds); {what}")
