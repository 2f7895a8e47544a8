"""The metrics comp scores predictions with, in one place: each one's name, direction, the tasks it fits and
how it is computed. Models answer in logits (single_label: class logits, multi_label: one logit per label,
regression: the values themselves); activate() turns them into what the metrics score (class probabilities,
label probabilities, values), and what fold averaging and blending average."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import f1_score, r2_score, roc_auc_score

SINGLE, MULTI, REGRESSION = "single_label", "multi_label", "regression"
TASKS = (SINGLE, MULTI, REGRESSION)


def activate(task: str, logits: np.ndarray) -> np.ndarray:
    """Logits → class probabilities (softmax), label probabilities (sigmoid) or values (as they are), float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == SINGLE:
        return softmax(logits, axis=1)
    return expit(logits) if task == MULTI else logits


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (single_label)."""
    return activate(SINGLE, logits)


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class)."""
    return np.bincount(np.asarray(y) * n_classes + np.asarray(pred), minlength=n_classes**2).reshape(n_classes, n_classes)


def accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / max(cm.sum(), 1))


def macro_f1(cm: np.ndarray) -> float:
    """F1 of every class (0 for a class never true nor predicted), averaged."""
    tp, denom = np.diag(cm).astype(np.float64), (cm.sum(0) + cm.sum(1)).astype(np.float64)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def binary_f1(cm: np.ndarray) -> float:
    """F1 of the positive class: the second of two sorted classes."""
    denom = cm[1].sum() + cm[:, 1].sum()
    return float(2 * cm[1, 1] / denom) if denom else 0.0


def qwk(cm: np.ndarray) -> float:
    """Quadratic weighted kappa, the classes in their sorted order (ordinal ratings)."""
    k = len(cm)
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(1), cm.sum(0)) / max(cm.sum(), 1)
    denom = (w * expected).sum()
    return float(1 - (w * cm).sum() / denom) if denom > 0 else 0.0


# single_label metrics of the predicted labels' confusion matrix (what a decision rule can raise)
LABEL_METRICS = {"macro_f1": macro_f1, "accuracy": accuracy, "qwk": qwk, "f1": binary_f1}


def _labels(fn: Callable[[np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray], float]:
    return lambda y, p: fn(confusion(y, p.argmax(1), p.shape[1]))


def _one_hot(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return y if p.ndim == y.ndim else np.eye(p.shape[1])[y]


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean cross-entropy of the true class (single_label) or mean binary cross-entropy per label (multi_label)."""
    p = np.clip(p, 1e-12, 1.0)
    if y.ndim == 1:
        return float(-np.log(p[np.arange(len(y)), y]).mean())
    return float(-(y * np.log(p) + (1 - y) * np.log(np.clip(1 - p, 1e-12, 1.0))).mean())


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of each class / label against the rest, averaged over those with both outcomes present (the
    mean column-wise AUC; for two classes, the binary AUC)."""
    truth = _one_hot(y, p)
    cols = [j for j in range(p.shape[1]) if 0 < truth[:, j].sum() < len(truth)]
    return float(np.mean([roc_auc_score(truth[:, j], p[:, j]) for j in cols])) if cols else float("nan")


def multi_label_f1(y: np.ndarray, p: np.ndarray) -> float:
    """F1 of each label at probability 0.5, averaged over the labels."""
    return float(f1_score(y, p >= 0.5, average="macro", zero_division=0))


MAX_LEVELS = 100  # QWK of a regression: targets with more distinct values are not ordinal levels (NaN)


def rounded_qwk(y: np.ndarray, p: np.ndarray) -> float:
    """QWK of values on ordinal levels (ratings, scores): each prediction rounded to the nearest level the
    targets show, the levels in sorted order; averaged over the targets. NaN beyond MAX_LEVELS levels."""
    out = []
    for j in range(y.shape[1]):
        levels = np.unique(y[:, j])
        if len(levels) > MAX_LEVELS:
            return float("nan")
        truth, pred = np.searchsorted(levels, y[:, j]), nearest_level(p[:, j], levels)
        out.append(qwk(confusion(truth, pred, len(levels))))
    return float(np.mean(out))


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The index of the level nearest each value (levels sorted; a tie goes to the lower level)."""
    if len(levels) == 1:
        return np.zeros(len(values), np.int64)
    right = np.clip(np.searchsorted(levels, values), 1, len(levels) - 1)
    left = right - 1
    return np.where(np.abs(values - levels[left]) <= np.abs(levels[right] - values), left, right)


def rmse(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p - y) ** 2)))


def mcrmse(y: np.ndarray, p: np.ndarray) -> float:
    """The RMSE of each target, averaged over the targets (Feedback Prize)."""
    return float(np.mean(np.sqrt(np.mean((p - y) ** 2, axis=0))))


def mae(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(p - y)))


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    """Pearson correlation of each target with its prediction (0 where either is constant), averaged."""
    out = []
    for j in range(y.shape[1]):
        a, b = y[:, j] - y[:, j].mean(), p[:, j] - p[:, j].mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        out.append(float((a * b).sum() / denom) if denom > 0 else 0.0)
    return float(np.mean(out))


def r2(y: np.ndarray, p: np.ndarray) -> float:
    return float(r2_score(y, p))


@dataclass(frozen=True)
class Metric:
    direction: str                                     # "max" or "min": which way is better
    tasks: tuple[str, ...]                             # the tasks it scores
    fn: Callable[[np.ndarray, np.ndarray], float]      # (targets, activated predictions) -> score
    on: str = "values"                                 # what it scores: labels (chosen by a cut), probabilities, values
    binary_only: bool = False                          # single_label with exactly two classes


REGISTRY = {
    "macro_f1": Metric("max", (SINGLE, MULTI), lambda y, p: (_labels(macro_f1) if y.ndim == 1 else multi_label_f1)(y, p),
                       "labels"),
    "accuracy": Metric("max", (SINGLE,), _labels(accuracy), "labels"),
    "qwk": Metric("max", (SINGLE, REGRESSION), lambda y, p: (_labels(qwk) if y.ndim == 1 else rounded_qwk)(y, p),
                  "labels"),
    "f1": Metric("max", (SINGLE,), _labels(binary_f1), "labels", binary_only=True),
    "roc_auc": Metric("max", (SINGLE, MULTI), roc_auc, "probabilities"),
    "log_loss": Metric("min", (SINGLE, MULTI), log_loss, "probabilities"),
    "rmse": Metric("min", (REGRESSION,), rmse),
    "mcrmse": Metric("min", (REGRESSION,), mcrmse),
    "mae": Metric("min", (REGRESSION,), mae),
    "pearson": Metric("max", (REGRESSION,), pearson),
    "r2": Metric("max", (REGRESSION,), r2),
}
DIRECTION = {name: m.direction for name, m in REGISTRY.items()}
DEFAULT = {SINGLE: "macro_f1", MULTI: "roc_auc", REGRESSION: "rmse"}  # data.metric = "auto"
# the columns of the CV tables, the competition's metric put first
SHOWN = {SINGLE: ("macro_f1", "accuracy", "log_loss"), MULTI: ("roc_auc", "macro_f1", "log_loss"),
         REGRESSION: ("rmse", "mae", "r2")}


def names(task: str, n_outputs: int | None = None) -> list[str]:
    """The metrics that score this task (binary-only ones when there are two classes, or n_outputs is unknown)."""
    return [n for n, m in REGISTRY.items()
            if task in m.tasks and not (m.binary_only and n_outputs is not None and n_outputs != 2)]


def default_loss(task: str, metric: str) -> str:
    """What train.loss = "auto" trains with: class weights where the metric rewards every class alike (macro-F1,
    of one class per row or of labels), plain cross-entropy where it scores probabilities or counts rows
    (accuracy, log loss, AUC, QWK, binary F1), the squared error for regression."""
    if task == REGRESSION:
        return "mse"
    return "balanced_ce" if metric == "macro_f1" else "ce"


def balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """The one class-weight rule of train.loss = "balanced_ce", for every kind of run (scikit-learn's "balanced"
    is the same): n / (k · count) of each class over these rows, k the classes they hold, so that the rows'
    weights average 1; 0 for a class they lack."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    k = max(int((counts > 0).sum()), 1)
    return np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)


def default(task: str, n_targets: int) -> str:
    return "mcrmse" if task == REGRESSION and n_targets > 1 else DEFAULT[task]


def columns(task: str, metric: str) -> tuple[str, ...]:
    """What a CV table shows: the competition's metric, then the task's usual ones."""
    return (metric, *(n for n in SHOWN[task] if n != metric))


def score_predictions(y: np.ndarray, predictions: np.ndarray, task: str = SINGLE) -> dict[str, float]:
    """Every metric of the task, of activated predictions (probabilities or values) against the targets."""
    p = np.asarray(predictions, dtype=np.float64)
    if task == REGRESSION:
        y, p = np.asarray(y, dtype=np.float64).reshape(len(p), -1), p.reshape(len(p), -1)
    return {n: REGISTRY[n].fn(y, p) for n in names(task, p.shape[1])}


def score(y: np.ndarray, logits: np.ndarray, task: str = SINGLE) -> dict[str, float]:
    """Every metric of the task, of logits (activated first) against the targets."""
    return score_predictions(y, activate(task, logits), task)


def constant(task: str, y: np.ndarray, n_outputs: int) -> np.ndarray:
    """The best constant prediction for the training targets: the majority class, the label rates, the mean."""
    if task == SINGLE:
        return np.tile(np.eye(n_outputs)[np.bincount(y, minlength=n_outputs).argmax()], (len(y), 1))
    return np.tile(np.asarray(y, dtype=np.float64).reshape(len(y), -1).mean(0), (len(y), 1))


def validation_row(scores: dict[str, float]) -> dict[str, float]:
    """An epoch's metrics as its history row spells them (val_macro_f1, val_rmse, ...): what train.monitor names.
    The log loss is the row's val_loss where training minimises it."""
    return {f"val_{name}": value for name, value in scores.items() if name != "log_loss"}


def line(scores: dict[str, float], metric: str, task: str = SINGLE) -> str:
    """The scores as one line, the competition's metric first: "qwk 0.7512  macro_f1 0.4534  ..."."""
    return "  ".join(f"{n} {scores[n]:.4f}" for n in columns(task, metric) if n in scores)


def row_line(row: dict) -> str:
    """An epoch's validation figures as one line: "val_loss 0.9312  val_macro_f1 0.4534  ..."."""
    return "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
