"""`python -m comp.submit`: CV score from the folds' OOF logits and a submission from their averaged test logits."""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from comp import cli, metrics, report
from comp.artifacts import atomic_path
from comp.config import Config
from comp.data import Competition, read_table
from comp.errors import CompError, run_cli
from comp.runs import FoldOutputs, load_run

METRICS = ("macro_f1", "accuracy", "log_loss")


def average_probabilities(fold_logits: list[np.ndarray]) -> np.ndarray:
    """Test probabilities: the mean over folds of each fold's softmax (not the softmax of mean logits)."""
    return np.mean([metrics.probabilities(lg) for lg in fold_logits], axis=0)


def test_logits_in_order(comp: Competition, outputs: list[FoldOutputs]) -> list[np.ndarray]:
    """Each fold's test logits, checked against the current test table's ids."""
    for out in outputs:
        if not np.array_equal(out.test_ids, comp.test_ids) or len(out.test_logits) != len(comp.test):
            raise CompError(f"the test table changed after fold {out.fold} was trained: "
                            f"retrain with python -m comp.train --all --force")
    return [out.test_logits for out in outputs]


def submission_frame(cfg: Config, comp: Competition, probs: np.ndarray) -> pd.DataFrame:
    """The submission in the sample submission's format: its columns, its id order; labels as spelled in train."""
    d = cfg.data
    by_id = pd.DataFrame(probs, index=comp.test_ids, columns=comp.classes)
    sample = comp.sample if comp.sample is not None else pd.DataFrame({d.id: comp.test_ids, d.label: ""})
    ids = sample[d.id].astype(str).to_numpy()
    answer_cols = [c for c in sample.columns if c != d.id]
    aligned = by_id.loc[ids]
    if answer_cols == [d.label] or len(answer_cols) == 1:
        predicted = np.array(comp.classes)[aligned.to_numpy().argmax(1)]
        return pd.DataFrame({d.id: sample[d.id].to_numpy(), answer_cols[0]: predicted})
    if set(map(str, answer_cols)) == set(comp.classes):
        out = pd.DataFrame({d.id: sample[d.id].to_numpy()})
        for col in answer_cols:
            out[col] = aligned[str(col)].to_numpy()
        return out
    raise CompError(f"sample submission columns {answer_cols} are neither one label column nor one column per "
                    f"class {comp.classes}; fix data.sample_submission")


def leaderboard(cfg: Config, comp: Competition, probs: np.ndarray) -> dict[str, float]:
    """Scores against the hidden answers (data.solution), when configured."""
    d = cfg.data
    path = cfg.path(d.solution)
    sol = read_table(path, "solution", d.id, (d.label,))
    for col in (d.id, d.label):
        if col not in sol.columns:
            raise CompError(f"solution file {path} lacks column {col!r}; it needs {d.id!r} and {d.label!r}")
    if set(sol[d.id]) != set(comp.test_ids):
        raise CompError(f"solution file {path} does not hold the test ids; use the solution of this test file")
    index = {c: i for i, c in enumerate(comp.classes)}
    unknown = sorted(set(sol[d.label]) - set(index))
    if unknown:
        raise CompError(f"solution file {path} has labels never seen in train ({unknown[:3]}); check data.label")
    pos = pd.Series(np.arange(len(comp.test_ids)), index=comp.test_ids)[sol[d.id].to_numpy()].to_numpy()
    y = sol[d.label].map(index).to_numpy()
    return metrics.score_probabilities(y, probs[pos])


def main(argv: list[str] | None = None) -> int:
    """Score the out-of-fold predictions (CV) and write submissions/<run>.csv from the fold-averaged test logits."""
    from comp import blend

    parser = cli.parser("comp.submit", main.__doc__)
    blend.add_arguments(parser, required=False)
    args = parser.parse_args(argv)
    if args.runs:  # several runs: the blend's submission
        return run_cli(lambda: blend.run(args))

    def body() -> int:
        started = time.perf_counter()
        console = cli.console(args.quiet)
        submit(cli.load_config(args, console), console)
        console.print(f"submit took {time.perf_counter() - started:.1f}s")
        return 0

    return run_cli(body)


def submit(cfg: Config, console: Console | None = None) -> dict:
    """Check and combine every fold of the run; print the CV table; write the submission."""
    console = console or cli.console()
    comp, folds, folds_fp, outputs, oof = load_run(cfg)
    probs = average_probabilities(test_logits_in_order(comp, outputs))
    frame = submission_frame(cfg, comp, probs)
    lb = leaderboard(cfg, comp, probs) if cfg.data.solution else None

    per_fold = [metrics.score(comp.y[folds == o.fold], o.oof_logits) for o in outputs]
    cv = metrics.score(comp.y, oof)
    majority = np.full(len(comp.y), np.bincount(comp.y).argmax())
    baseline = metrics.score(comp.y, np.eye(len(comp.classes))[majority])["macro_f1"]

    table = Table(title=f"run {cfg.run.name!r}: {cfg.folds.n_splits} folds, {len(comp.y)} OOF rows")
    for col in ("fold", "best epoch", *METRICS):
        table.add_column(col, justify="right")
    for o, m in zip(outputs, per_fold, strict=True):
        table.add_row(str(o.fold), str(o.record["best_epoch"]), *(f"{m[k]:.4f}" for k in METRICS))
    table.add_row("mean±std", "", *(f"{np.mean([m[k] for m in per_fold]):.4f}±{np.std([m[k] for m in per_fold]):.4f}"
                                    for k in METRICS), style="bold")
    table.add_row("CV (all OOF)", "", *(f"{cv[k]:.4f}" for k in METRICS), style="bold")
    console.print(table)
    console.print(f"CV macro_f1 {cv['macro_f1']:.4f}  accuracy {cv['accuracy']:.4f}  log_loss {cv['log_loss']:.4f}"
                  f"  (majority-class macro_f1 {baseline:.4f})")
    if lb:
        console.print(f"leaderboard macro_f1 {lb['macro_f1']:.4f}  accuracy {lb['accuracy']:.4f}  "
                      f"log_loss {lb['log_loss']:.4f}  ({cfg.path(cfg.data.solution)})")
    with atomic_path(cfg.submission_path) as tmp:
        frame.to_csv(tmp, index=False)
    console.print(f"wrote {cfg.submission_path} ({len(frame)} rows)")
    report.append_run(cfg, cv, lb, folds_fp)
    page = report.write_report(cfg, outputs, folds, comp.y, oof, comp.classes, cv, lb)
    console.print(f"recorded the run in {report.runs_path(cfg)}; report: {page}")
    return {"cv": cv, "folds": per_fold, "leaderboard": lb, "baseline_macro_f1": baseline,
            "path": str(cfg.submission_path)}


if __name__ == "__main__":
    sys.exit(main())
