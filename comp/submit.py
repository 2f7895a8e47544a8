"""`python -m comp.submit`: CV score from the folds' OOF logits and a submission from their averaged test logits."""

from __future__ import annotations

import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from comp import cli, metrics, report
from comp.artifacts import atomic_path, write_sealed_json
from comp.config import Config
from comp.errors import run_cli
from comp.outputs import decide
from comp.outputs.collect import (
    average_probabilities,
    fold_scores,
    leaderboard,
    load_run,
    outputs_stamp,
    refit_test_logits,
    submission_frame,
    test_logits_in_order,
)
from comp.tables import identity


def main(argv: list[str] | None = None) -> int:
    """Score the out-of-fold predictions (CV) and write submissions/<run>.csv from the fold-averaged test logits."""
    from comp import blend

    parser = cli.parser("comp.submit", main.__doc__)
    blend.add_arguments(parser, required=False)
    parser.add_argument("--seeds", type=int, metavar="N", help="a seed bag (comp.train --seeds N): score each seed "
                        "and their equal-weight average; the same as --set run.seeds=N")
    args = parser.parse_args(argv)
    if args.seeds is not None:
        args.set.append(f"run.seeds={args.seeds}")
    if args.runs:  # several runs: the blend's submission
        return run_cli(lambda: blend.run(args))

    def body() -> int:
        started = time.perf_counter()
        console = cli.console(args.quiet)
        cfg = cli.load_config(args, console)
        if cfg.run.seeds > 1:  # a seed bag: each seed's CV and the honest CV of their equal-weight average
            bag = {m.run.name: m for m in cfg.bag()}  # each seed checked against its own config, as submit checks
            blend.blend(cfg.replace("run", name=cfg.bag_name), list(bag), "equal", console, None, args.decide,
                        args.with_full, bag)
        else:
            submit(cfg, console, args.decide, args.with_full)
        console.print(f"submit took {time.perf_counter() - started:.1f}s")
        return 0

    return run_cli(body)


def submit(cfg: Config, console: Console | None = None, decide_labels: bool = False, with_full: bool = False) -> dict:
    """Check and combine every fold of the run; print the CV table; write the submission (its labels chosen by a
    cross-fitted decision rule with `decide_labels`, recorded in the run's decision.json for comp.export).
    `with_full`: the run's full-data refit joins the folds' test predictions as one more fold."""
    console = console or cli.console()
    task, metric = cfg.data.task, cfg.data.metric
    comp, folds, folds_fp, outputs, oof = load_run(cfg)
    test_logits = test_logits_in_order(comp, outputs)
    if with_full:
        test_logits.append(full_test_logits(cfg, comp, console))
    probs = average_probabilities(test_logits, task)
    lb = leaderboard(cfg, comp, probs) if cfg.data.solution else None
    rule = None
    if decide_labels:
        probs, rule = decide.for_submission(cfg, comp, folds, metrics.activate(task, oof), probs, console)
    frame = submission_frame(cfg, comp, probs)

    per_fold = fold_scores(cfg, comp, folds, outputs)
    cv = metrics.score(comp.y, oof, task)
    baseline = metrics.score_predictions(comp.y, metrics.constant(task, comp.y, len(comp.classes)), task)[metric]

    shown = metrics.columns(task, metric)
    table = Table(title=f"run {cfg.run.name!r}: {cfg.folds.n_splits} folds, {len(comp.y)} OOF rows")
    for col in ("fold", "best epoch", *shown):
        table.add_column(col, justify="right")
    for o, m in zip(outputs, per_fold, strict=True):
        table.add_row(str(o.fold), str(o.record["best_epoch"]), *(f"{m[k]:.4f}" for k in shown))
    table.add_row("mean±std", "", *(f"{np.mean([m[k] for m in per_fold]):.4f}±{np.std([m[k] for m in per_fold]):.4f}"
                                    for k in shown), style="bold")
    table.add_row("CV (all OOF)", "", *(f"{cv[k]:.4f}" for k in shown), style="bold")
    console.print(table)
    console.print(f"CV {metrics.line(cv, metric, task)}  (a constant prediction: {metric} {baseline:.4f})")
    if lb:
        console.print(f"leaderboard {metrics.line(lb, metric, task)}  ({cfg.path(cfg.data.solution)})")
    if rule and lb:
        console.print(f"leaderboard {rule['metric']} after the decision rule {rule['leaderboard_after']:.4f}")
    record_decision(cfg, rule and {**rule, "outputs": outputs_stamp(cfg)})
    with atomic_path(cfg.submission_path) as tmp:
        frame.to_csv(tmp, index=False)
    console.print(f"wrote {cfg.submission_path} ({len(frame)} rows)")
    report.append_run(cfg, cv, lb, folds_fp)
    page = report.write_report(cfg, outputs, per_fold, comp.y, oof, comp.classes, cv, lb)
    console.print(f"recorded the run in {report.runs_path(cfg)}; report: {page}")
    return {"cv": cv, "folds": per_fold, "leaderboard": lb, "baseline": baseline, "decision": rule,
            "path": str(cfg.submission_path)}


def full_test_logits(cfg: Config, comp, console: Console) -> np.ndarray:
    """The refit's test logits, checked against the current test table."""
    record, logits = refit_test_logits(cfg, comp, identity.content(cfg, comp))
    console.print(f"with the refit on all {record['n_train']} rows as one more fold of the test predictions (it has "
                  "no OOF rows: the CV below is the folds' alone)")
    return logits


def record_decision(cfg: Config, rule: dict | None) -> None:
    """The run's decision rule beside its folds (what comp.export bundles), or none when this submit had none."""
    path = cfg.run_dir / "decision.json"
    if rule is None:
        path.unlink(missing_ok=True)
    else:
        write_sealed_json(path, rule)


if __name__ == "__main__":
    sys.exit(main())
