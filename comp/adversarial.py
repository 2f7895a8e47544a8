"""`python -m comp.adversarial`: adversarial validation. Can a model tell the training rows from the test rows?
The linear run's features (TF-IDF of the text, the encoded metadata) into a logistic regression of "is a test
row", cross-validated over train + test: its ROC AUC is 0.5 when the two tables come from one distribution and
near 1 when something gives the test rows away. Writes each training row's out-of-fold "looks like test"
probability (folds/adversarial.csv: a validation subset, or a column to stratify or weight on) and a record
(folds/adversarial.json) that the report shows."""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from comp import cli, metrics
from comp.artifacts import atomic_path, write_json
from comp.classical.baselines import LinearRun
from comp.classical.text import Counts
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.tables.read import load_competition

N_SPLITS, TOP = 5, 15


def record_path(cfg: Config):
    return cfg.folds_path.parent / "adversarial.json"


def classifier_config(cfg: Config) -> Config:
    """The config of the train-vs-test classifier: the competition's columns as one binary, unweighted label."""
    data = cfg.replace("data", task=metrics.SINGLE, metric="auto", label=cfg.data.labels[0])
    return data.replace("train", loss="ce")


def adversarial(cfg: Config, console: Console | None = None) -> dict:
    """Cross-validated AUC of train-vs-test, the features that most give the test rows away (a model fitted on
    every row), and each training row's out-of-fold probability of being a test row; written under folds/."""
    console = console or cli.console()
    comp = load_competition(cfg)
    if not len(comp.test):
        raise CompError(f"test file {cfg.path(cfg.data.test)} has no rows to tell from the training rows")
    rows = pd.concat([comp.train.drop(columns=list(cfg.data.labels)), comp.test], ignore_index=True)
    texts = np.array(comp.train_text + comp.test_text, dtype=object)
    is_test = np.r_[np.zeros(len(comp.train), np.int64), np.ones(len(comp.test), np.int64)]
    acfg, seed = classifier_config(cfg), cfg.folds.seed
    oof, counts = np.zeros(len(rows)), Counts()  # the texts' n-grams, counted once for every fit
    for tr, va in StratifiedKFold(N_SPLITS, shuffle=True, random_state=seed).split(texts, is_test):
        run = LinearRun(acfg, seed, counts=counts).fit(rows.iloc[tr], list(texts[tr]), is_test[tr])
        oof[va] = np.exp(run.outputs(rows.iloc[va], list(texts[va])))[:, 1]
    auc = float(roc_auc_score(is_test, oof))
    full = LinearRun(acfg, seed, counts=counts).fit(rows, list(texts), is_test)
    coef, names = full.clf.coef_[0], full.feature_names(list(texts))
    top = [{"feature": names[i], "weight": float(coef[i])} for i in np.argsort(-np.abs(coef))[:TOP]]
    train_p = oof[:len(comp.train)]
    scores = pd.DataFrame({cfg.data.id: comp.train_ids, "p_test": train_p})
    with atomic_path(cfg.folds_path.parent / "adversarial.csv") as tmp:
        scores.to_csv(tmp, index=False)
    likeliest = np.argsort(-train_p)[:10]
    record = {"auc": auc, "n_train": len(comp.train), "n_test": len(comp.test), "folds": N_SPLITS,
              "top_features": top, "most_test_like": comp.train_ids[likeliest].tolist(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(record_path(cfg), record)
    table = Table(title=f"train vs test: ROC AUC {auc:.3f} ({N_SPLITS}-fold, {len(comp.train)} + {len(comp.test)} "
                        "rows; 0.5: no shift)")
    table.add_column("feature")
    table.add_column("weight (> 0: test)", justify="right")
    for t in top:
        table.add_row(t["feature"], f"{t['weight']:+.3f}")
    console.print(table)
    console.print(f"{verdict(auc)}; training rows most like test: {', '.join(record['most_test_like'][:5])}")
    console.print(f"wrote {cfg.folds_path.parent / 'adversarial.csv'} (p_test of each training row) and {record_path(cfg)}")
    return record


def verdict(auc: float) -> str:
    if auc < 0.6:
        return "no shift a linear model can see: the CV should carry to the test rows"
    if auc < 0.8:
        return "some shift: check the features above, and the CV of the training rows most like test"
    return "strong shift: the CV may not carry to the test rows; validate on the training rows most like test"


def main(argv: list[str] | None = None) -> int:
    """Adversarial validation: how well a linear model tells the training rows from the test rows."""
    parser = cli.parser("comp.adversarial", main.__doc__)
    args = parser.parse_args(argv)

    def body() -> int:
        started = time.perf_counter()
        console = cli.console(args.quiet)
        adversarial(cli.load_config(args, console), console)
        console.print(f"adversarial validation took {time.perf_counter() - started:.1f}s")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
