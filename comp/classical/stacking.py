"""Stacking: a level-2 model on the member runs' out-of-fold probabilities, cross-fitted so that fold k's
stacked predictions come from a model that never saw fold k's rows.

The level-2 model sees only the members' probabilities, never the metadata columns themselves: beside OOF
predictions, rare metadata values leak labels across folds (a value's rows in fold j were predicted by a
model fitted on its rows in fold k), which lifted the cross-fitted macro-F1 of the loans demo from 0.26 to
0.42 while its leaderboard stayed at 0.29. To give the stack the metadata, add a linear or gbm run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from comp.artifacts import atomic_path, read_json, write_json
from comp.classical.baselines import fitted_logistic, subsample

LEVEL2 = ("logistic", "gbm")
LEVEL2_ROWS = 100_000  # a level-2 model fits on at most this many OOF rows


def features(probs: list[np.ndarray]) -> np.ndarray:
    """Each member's log-probabilities side by side."""
    return np.hstack([np.log(np.clip(p, 1e-7, 1.0)) for p in probs])


def level2(kind: str, class_weight: str | None, seed: int):
    """An unfitted level-2 model: a multinomial logistic regression or a small gradient-boosting model."""
    if kind == "gbm":
        return HistGradientBoostingClassifier(learning_rate=0.05, max_iter=200, max_leaf_nodes=7, min_samples_leaf=30,
                                              l2_regularization=1.0, class_weight=class_weight, random_state=seed)
    return LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight, random_state=seed)


@dataclass
class Stacker:
    """A fitted level-2 model."""

    model: object
    n_classes: int

    def predict(self, probs: list[np.ndarray]) -> np.ndarray:
        """Class probabilities in the competition's full class order."""
        out = np.zeros((len(probs[0]), self.n_classes))
        out[:, self.model.classes_] = self.model.predict_proba(features(probs))
        return out

    def save(self, out: Path) -> list[str]:
        """A logistic level-2 model as stack.json + stack.safetensors (no pickle); returns the file names."""
        with atomic_path(out / "stack.safetensors") as tmp:
            save_numpy({"coef": np.ascontiguousarray(self.model.coef_, dtype=np.float64),
                        "intercept": np.ascontiguousarray(self.model.intercept_, dtype=np.float64)}, str(tmp))
        write_json(out / "stack.json", {"format": 1, "n_classes": self.n_classes,
                                        "classes": self.model.classes_.tolist()})
        return ["stack.json", "stack.safetensors"]

    @classmethod
    def load(cls, out: Path) -> Stacker:
        """A stack saved by save()."""
        spec, arrays = read_json(out / "stack.json"), load_numpy(str(out / "stack.safetensors"))
        return cls(fitted_logistic(arrays["coef"], arrays["intercept"], spec["classes"]), spec["n_classes"])


def fit(kind: str, y: np.ndarray, probs: list[np.ndarray], n_classes: int, class_weight: str | None,
        seed: int) -> Stacker:
    """Fit the level-2 model on these rows (a stratified LEVEL2_ROWS of them, on more: its few coefficients need
    no more, and on near-separable OOF probabilities each fit runs to its iteration cap)."""
    rows = subsample(y, LEVEL2_ROWS, seed)
    return Stacker(level2(kind, class_weight, seed).fit(features([p[rows] for p in probs]), y[rows]), n_classes)


def cross_fit(kind: str, y: np.ndarray, folds: np.ndarray, probs: list[np.ndarray], n_classes: int,
              class_weight: str | None, seed: int) -> tuple[np.ndarray, list[Stacker]]:
    """Honest stacked OOF probabilities: fold k's rows are predicted by a level-2 model fitted on the other
    folds' rows only. Returns them and the per-fold models."""
    out = np.zeros((len(y), n_classes))
    models = []
    for k in np.unique(folds):
        fit_rows, held = folds != k, folds == k
        model = fit(kind, y[fit_rows], [p[fit_rows] for p in probs], n_classes, class_weight, seed)
        out[held] = model.predict([p[held] for p in probs])
        models.append(model)
    return out, models
