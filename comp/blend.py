"""`python -m comp.blend --runs a,b,c` (or `comp.submit --runs a,b,c`): one submission from several runs
trained on the same folds, with equal weights or weights fitted on their out-of-fold probabilities."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.optimize import minimize

from comp import cli, metrics, report
from comp.artifacts import atomic_path, sha256, write_sealed_json
from comp.classical import stacking
from comp.classical.baselines import class_weight
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.outputs import decide
from comp.outputs.collect import (
    assemble_oof,
    average_probabilities,
    is_complete,
    leaderboard,
    outputs_stamp,
    read_config,
    read_fold,
    refit_test_logits,
    submission_frame,
    test_logits_in_order,
)
from comp.tables import identity
from comp.tables.read import load_competition
from comp.tables.splits import load_folds

WEIGHTS = ("auto", "fit", "hill", "equal")  # --weights: how a blend weighs its runs
STACK_ROWS = 10  # the stack is an auto candidate where the OOF rows are at least this many per level-2 coefficient


def fit_weights(y: np.ndarray, probs: list[np.ndarray], task: str = metrics.SINGLE) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the task's loss of sum_r w_r · probs_r on these rows: the
    log loss (single_label), the mean binary log loss (multi_label), the squared error of each target in units
    of its variance (regression)."""
    k = len(probs)
    if k == 1:
        return np.ones(1)
    jac = None
    if task == metrics.SINGLE:
        stacked = np.stack([p[np.arange(len(y)), y] for p in probs], axis=1)  # each run's probability of the truth

        def loss(w):
            return -np.log(np.clip(stacked @ w, 1e-15, None)).mean()

        def jac(w):
            return -(stacked / np.clip(stacked @ w, 1e-15, None)[:, None]).mean(0)
    else:
        stacked = np.stack(probs, axis=-1)

        def loss(w):
            return task_loss(task, y, stacked @ w)

    res = minimize(loss, np.full(k, 1.0 / k), jac=jac, method="SLSQP", bounds=[(0.0, 1.0)] * k,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}])
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def task_loss(task: str, y: np.ndarray, p: np.ndarray) -> float:
    """The task's loss of predictions p: the log loss (single_label), the mean binary log loss (multi_label), the
    squared error of each target in units of its variance (regression)."""
    if task != metrics.REGRESSION:
        return metrics.log_loss(y, p)
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    var = y2.var(0)
    return float(np.mean((p.reshape(len(y), -1) - y2) ** 2 / np.where(var > 0, var, 1.0)))


def hill_weights(y: np.ndarray, probs: list[np.ndarray], metric: str, max_steps: int = 100) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al., 2004): start from the best run on the metric,
    then add, one step at a time, the run whose addition to the blend (an equal-weight mean over the picks) best
    improves it; stop when no addition does. The weights are each run's share of the picks."""
    fn, sign = metrics.REGISTRY[metric].fn, 1.0 if metrics.DIRECTION[metric] == "max" else -1.0

    def value(p: np.ndarray) -> float:
        v = fn(y, p)
        return -np.inf if np.isnan(v) else sign * v

    counts = np.zeros(len(probs))
    scores = [value(p) for p in probs]
    first = int(np.argmax(scores))
    counts[first], total, best = 1, probs[first].astype(np.float64), scores[first]
    for step in range(1, max_steps):
        trials = [value((total + p) / (step + 1)) for p in probs]
        pick = int(np.argmax(trials))
        if trials[pick] <= best + 1e-12:
            break
        counts[pick] += 1
        total, best = total + probs[pick], trials[pick]
    return counts / counts.sum()


def honest_oof(y: np.ndarray, folds: np.ndarray, probs: list[np.ndarray],
               fitter=fit_weights) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fitted blend's OOF probabilities where each fold's rows are blended with weights fitted (fitter(y,
    probs)) on the other folds' rows only; returns them and the per-fold weights."""
    return cross_fitted(Candidate("weights", fitter), y, folds, probs)


class Candidate:
    """One way to combine the runs' probabilities: fitted on some rows (fit), then applied to any (apply)."""

    def __init__(self, name: str, fitter):
        self.name, self.fitter = name, fitter

    def fit(self, y: np.ndarray, probs: list[np.ndarray]):
        """What apply() takes: a weight per run, or a fitted level-2 model."""
        return self.fitter(y, probs)

    @staticmethod
    def apply(fitted, probs: list[np.ndarray]) -> np.ndarray:
        if isinstance(fitted, stacking.Stacker):
            return fitted.predict(probs)
        return sum(w * p for w, p in zip(fitted, probs, strict=True))


def signed_scores(y: np.ndarray, probs: list[np.ndarray], metric: str) -> np.ndarray:
    """Each prediction's `metric` on these rows, signed so that higher is better."""
    fn, sign = metrics.REGISTRY[metric].fn, 1.0 if metrics.DIRECTION[metric] == "max" else -1.0
    return np.array([sign * fn(y, p) for p in probs])


def kept(y: np.ndarray, probs: list[np.ndarray], metric: str, task: str) -> np.ndarray:
    """Which runs a mean keeps: those at least half as far above a constant prediction (on `metric`) as the best
    run; a run near the constant (noise) is dropped."""
    floor = signed_scores(y, [metrics.constant(task, y, probs[0].shape[1])], metric)[0]
    gains = signed_scores(y, probs, metric) - floor
    return gains >= 0.5 * gains.max() if gains.max() > 0 else gains == gains.max()


def cross_fitted(candidate: Candidate, y: np.ndarray, folds: np.ndarray,
                 probs: list[np.ndarray]) -> tuple[np.ndarray, list]:
    """The candidate's OOF probabilities, each fold's rows combined as fitted on the other folds' rows only, and
    what it fitted for each fold."""
    out, fitted = np.zeros_like(probs[0]), []
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        fitted.append(candidate.fit(y[fit], [p[fit] for p in probs]))
        out[held] = candidate.apply(fitted[-1], [p[held] for p in probs])
    return out, fitted


def choose(cands: list[Candidate], y: np.ndarray, folds: np.ndarray, probs: list[np.ndarray],
           task: str) -> tuple[int, list[float]]:
    """The candidate with the lowest cross-fitted task_loss on these rows (the first of a tie), and each one's loss.
    The loss, not data.metric: on a few thousand rows a label metric picks by noise (the reviews demo's nested
    macro-F1 chose the mean at +0.017 CV over the encoder run, which its leaderboard put 0.012 below it), and the
    probabilities are what a submission, --decide and a stack take."""
    losses = [task_loss(task, y, cross_fitted(c, y, folds, probs)[0]) for c in cands]
    return int(np.argmin(losses)), losses


def auto_ensemble(cfg: Config, y: np.ndarray, folds: np.ndarray, oofs: list[np.ndarray],
                  tests: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict, object]:
    """--weights auto: the combination chosen by a nested comparison. Fold k's rows are combined by the candidate
    with the lowest loss in a cross-fit over the other folds alone (choose), fitted on them, so the CV of the
    choice is honest about the choice itself; the test rows by the candidate lowest over every fold, fitted on
    every OOF row. Returns the honest OOF and test probabilities, what blend.json says, and the fitted choice."""
    task = cfg.data.task
    cands = candidates(cfg, len(y), len(oofs), oofs[0].shape[1])
    out, picks = np.zeros_like(oofs[0], dtype=np.float64), []
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        pick, _ = choose(cands, y[fit], folds[fit], [p[fit] for p in oofs], task)
        out[held] = cands[pick].apply(cands[pick].fit(y[fit], [p[fit] for p in oofs]), [p[held] for p in oofs])
        picks.append(cands[pick].name)
    pick, losses = choose(cands, y, folds, oofs, task)
    fitted = cands[pick].fit(y, oofs)
    record = {"chosen": cands[pick].name, "fold_choices": picks, "criterion": "log_loss" if task != metrics.REGRESSION
              else "squared error / variance", "candidates": dict(zip([c.name for c in cands], losses, strict=True))}
    return out, cands[pick].apply(fitted, tests), record, fitted


def candidates(cfg: Config, n_rows: int, n_runs: int, n_classes: int) -> list[Candidate]:
    """What --weights auto chooses among, simplest first (a tie goes to the simpler): the best run alone; the
    mean, fitted weights and hill-climbing of the runs kept() (a run far below the best gets weight 0); and
    (single_label, where the OOF rows number at least STACK_ROWS per coefficient of the level-2 model) the
    logistic stack of every run."""
    task, metric = cfg.data.task, cfg.data.metric

    def on_kept(fitter):  # weights for the runs kept(), 0 for the others
        def fit(y, probs):
            mask, weights = kept(y, probs, metric, task), np.zeros(len(probs))
            weights[mask] = fitter(y, [p for p, m in zip(probs, mask, strict=True) if m])
            return weights
        return fit

    def best(y, probs):
        return np.eye(len(probs))[int(np.argmax(signed_scores(y, probs, metric)))]

    out = [Candidate("best run", best), Candidate("mean", on_kept(lambda y, p: np.full(len(p), 1 / len(p)))),
           Candidate("fitted weights", on_kept(lambda y, p: fit_weights(y, p, task))),
           Candidate("hill-climbing", on_kept(lambda y, p: hill_weights(y, p, metric)))]
    if task == metrics.SINGLE and n_rows >= STACK_ROWS * n_classes * (n_classes * n_runs + 1):
        weight, seed = class_weight(cfg), cfg.train.seed
        out.append(Candidate("stack", lambda y, p: stacking.fit("logistic", y, p, n_classes, weight, seed)))
    return out


def load_member(cfg: Config, name: str, folds_fp: str, comp, folds, with_full: bool = False,
                expected: Config | None = None):
    """One run's OOF probabilities (train-row order) and fold-averaged test probabilities, checked to be
    finished, on these folds, for these classes and these tables (identity.tables of the columns the run read:
    a text-only run blends with a metadata-only one). `expected`: the config the run must have trained with (a
    seed bag's member), checked as submit checks a run; else its folds' own. `with_full`: a run with a refit
    (comp.train --full) adds it to its test side as one more fold; the fourth value is the refit's test-output
    digest, or None."""
    member = expected or cfg.replace("run", name=name)
    outputs = []
    for k in range(cfg.folds.n_splits):
        own = trained_config(member, k) if expected is None and is_complete(member, k) else member
        outputs.append(read_fold(member, k, folds_fp, check_config=expected is not None,
                                 now=identity.tables(own, comp)))
    hashes = {o.record.get("config_hash") for o in outputs}
    if len(hashes) > 1:
        raise CompError(f"run {name!r} mixes folds trained with different configs: retrain it with --all --force")
    oof = metrics.activate(cfg.data.task, assemble_oof(comp, folds, outputs))
    logits, refit = test_logits_in_order(comp, outputs), None
    if with_full and is_complete(member, "full"):  # the refit of the config the folds trained with
        own = expected or trained_config(member, 0)
        record, full = refit_test_logits(own, comp, identity.tables(own, comp))
        refit = record["sha256"]["test_logits.npy"]
        logits.append(full)
    return oof, average_probabilities(logits, cfg.data.task), outputs[0].record, refit


def trained_config(member: Config, fold: int) -> Config:
    """The config fold `fold` of a run was trained with (its config.toml), under the run's name and root."""
    return read_config(member.fold_dir(fold) / "config.toml", member.root).replace("run", name=member.run.name)


def stack(cfg: Config, comp, folds: np.ndarray, oofs: list[np.ndarray], tests: list[np.ndarray],
          kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The stack's honest OOF probabilities (cross-fitted), its test probabilities (refitted on every OOF row)
    and what blend.json says about it."""
    weight, n = class_weight(cfg), len(comp.classes)
    cv_oof, _ = stacking.cross_fit(kind, comp.y, folds, oofs, n, weight, cfg.train.seed)
    final = stacking.fit(kind, comp.y, oofs, n, weight, cfg.train.seed)
    return cv_oof, final.predict(tests), stack_record(cfg, final, kind)


def stack_record(cfg: Config, final: stacking.Stacker, kind: str = "logistic") -> dict:
    """What blend.json says of a fitted stack; a logistic one is saved beside it without a pickle, so comp.export
    can carry it."""
    record = {"level2": kind, "class_weight": class_weight(cfg)}
    if kind == "logistic":
        record["sha256"] = {name: sha256(cfg.run_dir / name) for name in final.save(cfg.run_dir)}
    return record


def blend(cfg: Config, names: list[str], how: str = "auto", console: Console | None = None,
          stack_with: str | None = None, decide_labels: bool = False, with_full: bool = False,
          expected: dict[str, Config] | None = None) -> dict:
    """Blend the runs (weights fitted or equal, or a level-2 model when stack_with names one); print each run's
    CV, the blend's and its weights; write the blend's submission (submissions/<run.name>.csv) and its record
    (folds/<run.name>/blend.json). `expected`: the configs some runs must have trained with (a seed bag's)."""
    console = console or cli.console()
    if not names:
        raise CompError("--runs is empty: name the runs to blend, e.g. --runs a,b,c")
    if cfg.run.name in names:
        raise CompError(f"the blend's run.name {cfg.run.name!r} is one of the blended runs: pass --name for the blend")
    if how not in WEIGHTS:
        raise CompError(f"--weights {how!r}: use one of {', '.join(WEIGHTS)}")
    if stack_with is not None and stack_with not in stacking.LEVEL2:
        raise CompError(f"--stack {stack_with!r}: use one of {', '.join(stacking.LEVEL2)}")
    task, metric = cfg.data.task, cfg.data.metric
    if stack_with is not None and task != metrics.SINGLE:
        raise CompError(f"--stack needs data.task = \"single_label\" (this one is {task!r}): blend with --weights")
    comp = load_competition(cfg)
    folds, folds_fp = load_folds(cfg, comp)
    members = [load_member(cfg, n, folds_fp, comp, folds, with_full, (expected or {}).get(n)) for n in names]
    refits = {n: m[3] for n, m in zip(names, members, strict=True) if m[3]}
    if with_full:  # the test side only: weights and stacks are fitted on the OOF rows, where no refit is
        console.print("with the refits of " + (", ".join(refits) or "no run (none has one)")
                      + " as one more fold of their test predictions; the CV below is the folds' alone")
    y = comp.y
    oofs, tests = [m[0] for m in members], [m[1] for m in members]

    equal_oof = np.mean(oofs, axis=0)
    stacked, chosen, fold_weights = None, None, []
    if stack_with:
        how = f"stack ({stack_with})"
        cv_oof, probs, stacked = stack(cfg, comp, folds, oofs, tests, stack_with)
    elif how == "auto":
        cv_oof, probs, chosen, fitted = auto_ensemble(cfg, y, folds, oofs, tests)
        stacked = stack_record(cfg, fitted) if isinstance(fitted, stacking.Stacker) else None
        weights = None if stacked else fitted
    elif how != "equal":
        fitter = {"fit": lambda yy, pp: fit_weights(yy, pp, task), "hill": lambda yy, pp: hill_weights(yy, pp, metric)}[how]
        weights = fitter(y, oofs)
        cv_oof, fold_weights = honest_oof(y, folds, oofs, fitter)
    else:
        weights, cv_oof = np.full(len(names), 1.0 / len(names)), equal_oof
    if stacked:
        weights = np.full(len(names), np.nan)
    elif how != "auto":
        probs = sum(w * t for w, t in zip(weights, tests, strict=True))

    table = Table(title=f"blend {cfg.run.name!r} of {len(names)} run(s) on {cfg.folds.n_splits} folds, {len(y)} OOF rows")
    shown = metrics.columns(task, metric)
    for col in ("", "weight", *shown):
        table.add_column(col, justify="right")
    rows = {}
    for name, w, p in zip(names, weights, oofs, strict=True):
        rows[name] = metrics.score_predictions(y, p, task)
        table.add_row(f"run {name}", "" if stacked else f"{w:.3f}", *(f"{rows[name][k]:.4f}" for k in shown))
    equal = metrics.score_predictions(y, equal_oof, task)
    table.add_row("equal weights", "", *(f"{equal[k]:.4f}" for k in shown))
    cv = metrics.score_predictions(y, cv_oof, task)
    if how != "equal":
        label = (f"auto: {chosen['chosen']} (chosen and fitted on the other folds)" if chosen else
                 "stacked (level-2 model from the other folds)" if stack_with else "fitted (weights from the other folds)")
        table.add_row(label, "", *(f"{cv[k]:.4f}" for k in shown), style="bold")
    console.print(table)
    if chosen:
        console.print(f"auto: each candidate's cross-fitted {chosen['criterion']}: " + ", ".join(
            f"{c} {v:.4f}" for c, v in chosen["candidates"].items()) + f"; chosen for the test rows: {chosen['chosen']}"
            + f"; per fold (chosen on the other folds): {', '.join(chosen['fold_choices'])}")
    console.print(f"blend CV {metrics.line(cv, metric, task)}"
                  f"  ({'equal weights' if how == 'equal' else how + ' fitted on k-1 folds, scored on the held-out fold'})"
                  + ("" if stacked else "; weights: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights,
                                                                                                  strict=True))))
    lb = leaderboard(cfg, comp, probs) if cfg.data.solution else None
    if lb:
        console.print(f"leaderboard {metrics.line(lb, metric, task)}  ({cfg.path(cfg.data.solution)})")
    rule = None
    if decide_labels:  # on the blend's honest OOF probabilities: each fold's from weights fitted without it
        probs, rule = decide.for_submission(cfg, comp, folds, cv_oof, probs, console)
        if lb:
            console.print(f"leaderboard {rule['metric']} after the decision rule {rule['leaderboard_after']:.4f}")
    frame = submission_frame(cfg, comp, probs)
    record = {"runs": names, "weights_method": how, "stack": stacked, "decision": rule, "auto": chosen,
              "weights": None if stacked else np.asarray(weights).tolist(),
              "fold_weights": [w.tolist() for w in fold_weights], "cv": cv, "equal_weights_cv": equal,
              "member_cv": rows, "leaderboard": lb, "folds_fingerprint": folds_fp,
              "member_config_hashes": {n: m[2].get("config_hash") for n, m in zip(names, members, strict=True)},
              "member_outputs": {n: outputs_stamp(cfg.replace("run", name=n)) for n in names},
              "with_full": refits,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_sealed_json(cfg.run_dir / "blend.json", record)
    with atomic_path(cfg.submission_path) as tmp:
        frame.to_csv(tmp, index=False)
    console.print(f"wrote {cfg.submission_path} ({len(frame)} rows) and {cfg.run_dir / 'blend.json'}")
    report.append_run(cfg, cv, lb, folds_fp, model=f"blend of {'+'.join(names)}", config_hash="blend")
    return record


def add_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--runs", required=required, help="comma-separated run names trained on the same folds")
    parser.add_argument("--weights", default="auto", choices=WEIGHTS,
                        help="auto (default): the best run alone, the mean, fitted weights, hill-climbing or the "
                             "stack, chosen by a nested cross-fit (its CV counts the choice); fit: weights minimising "
                             "the OOF loss of the task; hill: greedy forward selection with replacement on "
                             "data.metric; equal: plain average")
    parser.add_argument("--stack", nargs="?", const="logistic", choices=stacking.LEVEL2,
                        help="instead of weights, a level-2 model on the runs' OOF probabilities (cross-fitted): "
                             "logistic (default) or gbm")
    parser.add_argument("--decide", action="store_true",
                        help="choose the labels by per-class weights on the probabilities fitted to data.metric on the "
                             "OOF rows (cross-fitted: the CV of the rule is honest); label submissions only")
    parser.add_argument("--name", default="blend", help="the blend's run name (submission file name); default blend")
    parser.add_argument("--with-full", action="store_true", help="add each run's full-data refit (comp.train --full) "
                        "to its test predictions as one more fold (the CV, weights and stacks stay the folds')")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    console = cli.console(args.quiet)
    args.set = [*args.set, f"run.name={args.name}"]
    cfg = cli.load_config(args, console)
    blend(cfg, [n.strip() for n in args.runs.split(",") if n.strip()], args.weights, console, args.stack, args.decide,
          args.with_full)
    console.print(f"blend took {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Blend several runs trained on the same folds into one submission."""
    parser = cli.parser("comp.blend", main.__doc__)
    add_arguments(parser, required=True)
    args = parser.parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
