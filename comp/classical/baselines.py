"""Classical runs on the same folds, for blending and stacking with the encoder runs:
- linear: TF-IDF word and char n-grams + the encoded metadata → logistic regression;
- gbm: the metadata (native categoricals, raw numerics) + TF-IDF SVD components → LightGBM.
Each fits on a fold's training rows only and returns log-probabilities as the fold's logits (linear, for the other
tasks: label logits or values)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from comp import metrics
from comp.artifacts import atomic_path, read_json, write_json
from comp.classical.text import OLD_SPEC, Counts, HashedTfidf, load_text, tfidf_spec
from comp.config import Config
from comp.errors import CompError
from comp.metrics import REGRESSION, SINGLE
from comp.tables.features import MetaEncoder, prepare_columns

SVD_COMPONENTS = 64


def class_weight(cfg: Config) -> str | None:
    """train.loss = "balanced_ce" weights the classes of every model kind alike."""
    return "balanced" if cfg.train.loss == "balanced_ce" else None


C_GRID = (0.25, 1.0, 4.0, 16.0)  # tfidf.C = "auto": the candidates of the inner CV, ascending
INNER_FOLDS = 3
SEARCH_ROWS = 50_000  # the inner CV of C reads at most this many of the fold's training rows
PARALLEL_ROWS = 10_000  # from this many rows on, the C search fits its inner folds in parallel processes
SAGA_ROWS = 50_000  # from this many rows on, the logistic regression is fitted by saga (lbfgs below)
GBM_ROWS = 50_000  # a gbm run fits (TF-IDF, SVD, trees) on at most this many of the fold's training rows


def logistic(rows: int, **kw) -> LogisticRegression:
    """The logistic regression of a linear run on this many rows: lbfgs, or saga on many rows (an epoch costs
    one pass, and a few dozen converge where lbfgs takes hundreds of iterations of the same cost)."""
    solver = {"solver": "saga", "tol": 1e-3, "max_iter": 100} if rows >= SAGA_ROWS else {"max_iter": 2000}
    return LogisticRegression(**{**solver, **kw})


def subsample(y: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """Indices of at most `rows` of these labels' rows, stratified (all of them when there are fewer)."""
    if len(y) <= rows:
        return np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    return np.sort(train_test_split(np.arange(len(y)), train_size=rows, stratify=stratify, random_state=seed)[0])


def inner_cv_c(x: sparse.csr_matrix, y: np.ndarray, weight: str | None, seed: int,
               groups: np.ndarray | None = None) -> float:
    """tfidf.C = "auto": the C of C_GRID whose logistic regression has the lowest log loss in an INNER_FOLDS-fold
    CV over these rows only (a fold's training rows: its validation rows never choose). The log loss, not
    data.metric: on a few hundred rows a label metric picks C by noise, and the probabilities are what blends,
    stacks and decision rules take from the run. Each inner fold fits
    the Cs in ascending order, each fit starting from the last one's coefficients, to a looser tolerance than
    the final fit: the whole search costs about two plain fits. On more than SEARCH_ROWS rows, a stratified
    SEARCH_ROWS of them choose. `groups` (folds.group): the inner split keeps each group on one side, as the outer
    folds do."""
    rows = subsample(y, SEARCH_ROWS, seed)
    x, y, groups = x[rows], y[rows], None if groups is None else groups[rows]
    counts = np.bincount(y)
    if counts[counts > 0].min() < INNER_FOLDS or (groups is not None and len(set(groups)) < INNER_FOLDS):
        return 1.0
    splitter = StratifiedKFold if groups is None else StratifiedGroupKFold
    parts = list(splitter(INNER_FOLDS, shuffle=True, random_state=seed).split(x, y, groups))
    jobs = min(INNER_FOLDS, torch_threads()) if len(y) >= PARALLEL_ROWS else 1
    paths = Parallel(n_jobs=jobs)(delayed(c_path)(x[tr], y[tr], x[va], weight, seed, int(y.max()) + 1)
                                  for tr, va in parts)
    probs = np.zeros((len(C_GRID), len(y), int(y.max()) + 1))
    for (_, va), p in zip(parts, paths, strict=True):
        probs[:, va] = p
    return C_GRID[int(np.argmin([metrics.log_loss(y, p) for p in probs]))]


def c_path(x: sparse.csr_matrix, y: np.ndarray, x_val: sparse.csr_matrix, weight: str | None, seed: int,
           n_classes: int) -> np.ndarray:
    """One inner fold of the C search: the validation rows' probabilities under each C of C_GRID, fitted in
    ascending order, each fit starting from the last one's coefficients."""
    clf = LogisticRegression(max_iter=2000, class_weight=weight, random_state=seed, warm_start=True, tol=1e-3)
    probs = np.zeros((len(C_GRID), x_val.shape[0], n_classes))
    for i, c in enumerate(C_GRID):
        clf.set_params(C=c).fit(x, y)
        probs[i][:, clf.classes_] = clf.predict_proba(x_val)
    return probs


def has_text(texts: list[str]) -> bool:
    return any(t.strip() for t in texts)


def fitted_logistic(coef: np.ndarray, intercept: np.ndarray, classes: list) -> LogisticRegression:
    """A LogisticRegression that predicts with saved coefficients (what fit would have set), read without a pickle."""
    clf = LogisticRegression()
    clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, np.asarray(classes)
    clf.n_features_in_ = coef.shape[1]
    return clf


def linear_outputs(task: str, x: sparse.csr_matrix, y: np.ndarray, weight: str | None,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients and intercepts of one linear output per label (multi_label: a logistic regression each, a
    label these rows always or never show a constant logit of ±20) or per target (regression: ridge)."""
    if task == REGRESSION:
        ridge = Ridge(alpha=1.0).fit(x, y)
        return ridge.coef_.reshape(y.shape[1], -1), np.reshape(ridge.intercept_, y.shape[1])
    coef, intercept = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        if 0 < y[:, j].sum() < len(y):
            clf = LogisticRegression(C=1.0, max_iter=2000, class_weight=weight, random_state=seed).fit(x, y[:, j])
            coef[j], intercept[j] = clf.coef_[0], clf.intercept_[0]
        else:
            intercept[j] = 20.0 if y[0, j] else -20.0
    return coef, intercept


class LinearRun:
    """TF-IDF of the text ⊕ the fold's metadata encoding → multinomial logistic regression (single_label), a
    logistic regression per label (multi_label) or ridge regression (regression)."""

    def __init__(self, cfg: Config, seed: int, say=None, counts: Counts | None = None):
        self.say = say or (lambda message: None)  # progress, one line at a time
        self.counts = counts or Counts()  # the texts' n-gram counts, shared with the other folds
        self.meta = MetaEncoder.from_config(cfg)
        self.text: HashedTfidf | None = None
        self.task, self.seed, self.weight = cfg.data.task, seed, class_weight(cfg)
        self.cfg, self.spec, self.c = cfg, OLD_SPEC, 1.0
        self.clf = LogisticRegression()
        self.coef = self.intercept = None

    def _features(self, df: pd.DataFrame, texts: list[str]) -> sparse.csr_matrix:
        parts = [sparse.csr_matrix(self.meta.transform(df), dtype=np.float32)]
        if self.text is not None:
            parts.insert(0, self.text.transform(texts, self.counts))
        return sparse.hstack(parts, format="csr")

    def fit(self, df: pd.DataFrame, texts: list[str], y: np.ndarray) -> LinearRun:
        started = time.perf_counter()
        self.meta.fit(df)
        self.spec = tfidf_spec(self.cfg, texts)
        self.text = HashedTfidf(self.spec).fit(texts, self.counts) if has_text(texts) else None
        x = self._features(df, texts)
        self.say(f"TF-IDF {self.spec['analyzer']} and metadata of {len(texts)} rows: {x.shape[1]} features in "
                 f"{time.perf_counter() - started:.1f}s")
        if x.shape[1] == 0:
            raise CompError("model.kind = 'linear' needs text or metadata: data.text is empty on every row and "
                            "data.categorical / data.numeric name no column")
        started = time.perf_counter()
        if self.task == SINGLE:
            c = self.cfg.model.tfidf.C
            group = self.cfg.folds.group
            if c == "auto":
                self.say(f"choosing C among {', '.join(map(str, C_GRID))} by a {INNER_FOLDS}-fold inner CV")
                self.c = inner_cv_c(x, y, self.weight, self.seed, df[group].to_numpy() if group else None)
                self.say(f"C {self.c:g} chosen in {time.perf_counter() - started:.1f}s")
            else:
                self.c = float(c)
            started = time.perf_counter()
            self.clf = logistic(len(y), C=self.c, class_weight=self.weight, random_state=self.seed).fit(x, y)
        else:
            self.coef, self.intercept = linear_outputs(self.task, x, y, self.weight, self.seed)
        self.say(f"fitted on {len(y)} rows in {time.perf_counter() - started:.1f}s")
        return self

    def feature_names(self, texts: list[str]) -> list[str]:
        """The name of each feature column: word__… / char__… n-grams of the text (a term of the first 20,000
        `texts` that hashes there), then the metadata's."""
        text = [] if self.text is None else self.text.feature_names(texts[:20_000])
        return text + self.meta.feature_names()

    def outputs(self, df: pd.DataFrame, texts: list[str]) -> np.ndarray:
        """Log-probabilities of the classes it saw (single_label); label logits or values (the other tasks)."""
        x = self._features(df, texts)
        return self.clf.predict_log_proba(x) if self.task == SINGLE else x @ self.coef.T + self.intercept

    def save(self, out: Path) -> None:
        """linear.json (metadata encoder, text spec, task, classes) and linear.safetensors (the text's columns
        and idf, coefficients)."""
        single = self.task == SINGLE
        arrays = {"coef": self.clf.coef_ if single else self.coef, "intercept": self.clf.intercept_ if single
                  else self.intercept}
        save_arrays(out / "linear.safetensors", {**arrays, **({} if self.text is None else self.text.arrays())})
        write_json(out / "linear.json", {"format": 2, "meta": self.meta.to_dict(), "hashed": self.text is not None,
                                         "tfidf": {**self.spec, "C": self.c},
                                         "task": self.task, "classes": self.clf.classes_.tolist() if single else None})

    @classmethod
    def load(cls, out: Path) -> LinearRun:
        """A linear run saved by save(); reads no pickle."""
        spec, arrays = read_json(out / "linear.json"), load_numpy(str(out / "linear.safetensors"))
        run = cls.__new__(cls)
        run.meta, run.counts = MetaEncoder.from_dict(spec["meta"]), Counts()
        run.text = load_text(spec.get("tfidf", OLD_SPEC), spec, arrays)
        run.task = spec.get("task", SINGLE)
        if run.task == SINGLE:
            run.clf = fitted_logistic(arrays["coef"], arrays["intercept"], spec["classes"])
        else:
            run.coef, run.intercept = arrays["coef"], arrays["intercept"]
        return run


class GbmRun:
    """LightGBM ([model.gbm]) on native categoricals, raw numerics and SVD components of the text's TF-IDF; its
    rounds stop early on the fold's validation rows (as an encoder's epochs do). Saved in LightGBM's own text format beside
    JSON and safetensors: no pickle, so gbm runs export into bundles."""

    task = SINGLE
    CATEGORIES = 250  # the most frequent values of a categorical get codes; rarer and unseen ones are missing

    def __init__(self, cfg: Config, seed: int, say=None, counts: Counts | None = None):
        self.say = say or (lambda message: None)  # progress, one line at a time
        self.counts = counts or Counts()  # the texts' n-gram counts, shared with the other folds
        self.categorical, self.numeric = cfg.data.categorical, cfg.data.numeric
        self.codes: dict[str, dict[str, int]] = {}
        self.text: HashedTfidf | None = None
        self.components: np.ndarray | None = None  # the SVD's, (n_svd, text features)
        self.seed, self.weighted, self.cfg = seed, class_weight(cfg) is not None, cfg
        self.spec, self.booster, self.classes_ = OLD_SPEC, None, np.zeros(0, dtype=np.int64)

    def _features(self, df: pd.DataFrame, texts: list[str]) -> np.ndarray:
        cols = prepare_columns(df, self.categorical, self.numeric)
        parts = [np.zeros((len(df), 0))]
        if self.components is not None:
            parts.append(np.asarray(self.text.transform(texts, self.counts) @ self.components.T))
        for c in self.categorical:
            parts.append(cols[c].map(self.codes[c]).to_numpy(dtype=float)[:, None])  # unseen: NaN (missing)
        if self.numeric:
            parts.append(cols[list(self.numeric)].to_numpy(dtype=float))
        return np.hstack(parts)

    def _fit_text(self, texts: list[str]) -> None:
        """The TF-IDF of these rows and its SVD (self.spec resolved)."""
        text = HashedTfidf(self.spec).fit(texts, self.counts) if has_text(texts) else None
        if text is None:
            return
        matrix = text.transform(texts, self.counts)
        n_svd = min(SVD_COMPONENTS, matrix.shape[1] - 1, len(texts) - 1)
        if n_svd >= 1:
            self.text, self.components = text, TruncatedSVD(n_svd, random_state=self.seed).fit(matrix).components_

    def fit(self, df: pd.DataFrame, texts: list[str], y: np.ndarray, valid: tuple | None = None) -> GbmRun:
        """`valid`: the fold's validation rows (table, texts, labels), on which the rounds stop early. On more
        than GBM_ROWS rows, a stratified GBM_ROWS of them fit: a round's cost grows with the rows, and on 64 SVD
        components and a few metadata columns the trees gain little from more. Likewise at most GBM_ROWS of the
        validation rows stop the rounds: every round adds its trees' output to each of them."""
        import lightgbm

        self.spec = tfidf_spec(self.cfg, texts)  # on every training row: their number chooses the analyzer
        if len(y) > GBM_ROWS:
            rows = subsample(y, GBM_ROWS, self.seed)
            df, texts, y = df.iloc[rows], [texts[i] for i in rows], y[rows]
            self.say(f"fitting on a stratified {GBM_ROWS} of the training rows")

        cols = prepare_columns(df, self.categorical, ())
        for c in self.categorical:
            top = cols[c].value_counts().index[:self.CATEGORIES]
            self.codes[c] = {str(v): i for i, v in enumerate(top)}
        started = time.perf_counter()
        self._fit_text(texts)
        x = self._features(df, texts)
        self.say(f"TF-IDF {self.spec['analyzer']}, {0 if self.components is None else len(self.components)} SVD "
                 f"components and metadata of {len(texts)} rows: {x.shape[1]} features in "
                 f"{time.perf_counter() - started:.1f}s")
        if x.shape[1] == 0:
            raise CompError("model.kind = 'gbm' needs text or metadata: data.text is empty on every row and "
                            "data.categorical / data.numeric name no column")
        self.classes_ = np.unique(y)
        codes = np.searchsorted(self.classes_, y)
        weight = metrics.balanced_weights(codes, len(self.classes_)) if self.weighted else None
        n_text = 0 if self.components is None else len(self.components)
        g = self.cfg.model.gbm
        clf = lightgbm.LGBMClassifier(
            n_estimators=g.rounds, learning_rate=g.learning_rate, num_leaves=g.num_leaves,
            min_child_samples=g.min_child_samples, reg_lambda=g.reg_lambda, subsample=g.subsample, subsample_freq=1,
            colsample_bytree=g.colsample, random_state=self.seed, verbose=-1, n_jobs=max(1, torch_threads()))
        fit = {"sample_weight": None if weight is None else weight[codes], "callbacks": [self.every(100)],
               "categorical_feature": list(range(n_text, n_text + len(self.categorical))) or "auto"}
        seen = np.flatnonzero(np.isin(valid[2], self.classes_)) if valid is not None else np.zeros(0, dtype=int)
        if len(seen):  # the validation rows of classes these rows show, at most GBM_ROWS of them
            vy = np.searchsorted(self.classes_, valid[2][seen])
            keep = subsample(vy, GBM_ROWS, self.seed)
            seen, vy = seen[keep], vy[keep]
            vx = self._features(valid[0].iloc[seen], list(np.asarray(valid[1], dtype=object)[seen]))
            fit.update(eval_X=(vx,), eval_y=(vy,))  # stopped by the plain log loss: the probabilities blends take
            fit["callbacks"].append(lightgbm.early_stopping(50, verbose=False))
        started = time.perf_counter()
        self.booster = clf.fit(x, codes, **fit).booster_
        self.say(f"{self.booster.current_iteration()} rounds in {time.perf_counter() - started:.1f}s")
        return self

    def every(self, period: int):
        """A LightGBM callback that says the round (and the validation log loss) every `period` rounds."""
        def report(env) -> None:
            if (env.iteration + 1) % period == 0:
                scores = "".join(f", validation {name} {value:.4f}" for _, name, value, _ in env.evaluation_result_list)
                self.say(f"round {env.iteration + 1} of at most {env.end_iteration}{scores}")
        return report

    def outputs(self, df: pd.DataFrame, texts: list[str]) -> np.ndarray:
        p = self.booster.predict(self._features(df, texts), num_iteration=self.booster.best_iteration or None)
        p = np.column_stack([1 - p, p]) if p.ndim == 1 else p  # two classes: the booster gives the second's
        return np.log(np.clip(p, 1e-12, 1.0))

    @property
    def clf(self):  # what ClassicalModel reads: the classes this fold's rows showed
        return self

    @property
    def rounds(self) -> int:
        """The boosting rounds kept (early stopping's best)."""
        return self.booster.best_iteration or self.booster.current_iteration()

    def save(self, out: Path) -> None:
        """gbm.txt (the booster, LightGBM's text format), gbm.json (codes, text spec, vocabularies, classes) and
        gbm.safetensors (idf, SVD components)."""
        with atomic_path(out / "gbm.txt") as tmp:
            tmp.write_text(self.booster.model_to_string(num_iteration=self.booster.best_iteration or None),
                           encoding="utf-8")
        arrays = {} if self.text is None else {**self.text.arrays(), "components": self.components}
        save_arrays(out / "gbm.safetensors", arrays or {"none": np.zeros(0)})
        write_json(out / "gbm.json", {"format": 2, "categorical": list(self.categorical), "numeric": list(self.numeric),
                                      "codes": self.codes, "tfidf": self.spec, "hashed": self.text is not None,
                                      "classes": self.classes_.tolist()})

    @classmethod
    def load(cls, out: Path) -> GbmRun:
        """A gbm run saved by save(); reads no pickle."""
        import lightgbm

        spec, arrays = read_json(out / "gbm.json"), load_numpy(str(out / "gbm.safetensors"))
        run = cls.__new__(cls)
        run.categorical, run.numeric = tuple(spec["categorical"]), tuple(spec["numeric"])
        run.codes, run.spec, run.classes_ = spec["codes"], spec["tfidf"], np.asarray(spec["classes"])
        run.text, run.counts = load_text(spec["tfidf"], spec, arrays), Counts()
        run.components = arrays.get("components")
        run.booster = lightgbm.Booster(model_str=(out / "gbm.txt").read_text(encoding="utf-8"))
        return run


def torch_threads() -> int:
    """The threads the machine offers this process (what torch uses too)."""
    import torch

    return torch.get_num_threads()


def save_arrays(path: Path, arrays: dict) -> None:
    """Arrays as safetensors, written atomically."""
    with atomic_path(path) as tmp:
        save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))


KINDS = {"linear": LinearRun, "gbm": GbmRun}


def fit_classical(cfg: Config, df: pd.DataFrame, texts: list[str], y: np.ndarray, n_classes: int, seed: int,
                  valid: tuple | None = None, say=None, counts: Counts | None = None):
    """Fit model.kind on these rows (a gbm run stops its rounds early on `valid`: table, texts, labels); a class
    missing from them gets a log-probability of log(1e-12). `say`: where its progress lines go; `counts`: the
    n-gram counts the folds share."""
    run = KINDS[cfg.model.kind](cfg, seed, say, counts)
    return ClassicalModel(run.fit(df, texts, y, valid) if cfg.model.kind == "gbm" else run.fit(df, texts, y),
                          n_classes)


class ClassicalModel:
    """A fitted classical run that answers in the competition's full class order."""

    def __init__(self, model: LinearRun | GbmRun, n_classes: int):
        self.model, self.n_classes = model, n_classes

    def logits(self, df: pd.DataFrame, texts: list[str]) -> np.ndarray:
        if self.model.task != SINGLE:
            return self.model.outputs(df, texts).astype(np.float32).reshape(len(df), self.n_classes)
        out = np.full((len(df), self.n_classes), np.log(1e-12), dtype=np.float32)
        if len(df):
            out[:, self.model.clf.classes_] = self.model.outputs(df, texts)
        return out

    def save(self, out: Path) -> None:
        self.model.save(out)


def load_classical(kind: str, out: Path, n_classes: int) -> ClassicalModel:
    """A fold's fitted classical run (its files' sha256 checked by the caller)."""
    return ClassicalModel(KINDS[kind].load(out), n_classes)
