"""`python -m comp.train`: train one fold (--fold K) or every fold (--all) of the configured run."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from comp import cli, metrics
from comp.artifacts import write_text
from comp.classical.text import Counts
from comp.config import Config
from comp.errors import CompError, OutOfTime, run_cli
from comp.nn import distributed
from comp.nn.hardware import resolve_device
from comp.nn.model import check_packing, check_quantize
from comp.nn.parallel import make_slots, run_folds
from comp.nn.state import optimizer_class
from comp.outputs.collect import (
    is_complete,
    read_config,
    stale,
    teacher_fold,
    unrefittable,
    verify_fold,
)
from comp.outputs.runs import (
    Distill,
    tokenize_tables,
    train_classical_fold,
    train_fold,
    train_full,
)
from comp.predict import FoldModel, fold_predictor
from comp.tables import identity
from comp.tables.read import Competition, load_competition
from comp.tables.splits import load_folds


def main(argv: list[str] | None = None) -> int:
    """Train folds; each writes its weights, encoders, OOF and test logits and metrics under folds/<run>/."""
    parser = cli.parser("comp.train", main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="the fold to train (0 .. n_splits-1)")
    which.add_argument("--all", action="store_true", help="train every fold in turn")
    which.add_argument("--full", action="store_true", help="after the folds: one model on every training row, for "
                       "the median of the folds' best epochs (gbm: rounds); comp.submit --with-full adds it")
    parser.add_argument("--epochs", type=int, metavar="N", help="with --full: train N epochs (gbm: rounds) instead")
    parser.add_argument("--force", action="store_true", help="retrain folds that are already finished")
    parser.add_argument("--devices", help="with --all: GPU ids, e.g. 0,1,2,3; one fold process per GPU at a time")
    parser.add_argument("--jobs", type=int, default=1, help="with --all: fold processes at once on the CPU")
    parser.add_argument("--pseudo", metavar="RUN", help="add RUN's confident test predictions (train.pseudo_threshold) "
                        "to every fold's training part; the same as --set train.pseudo_run=RUN")
    parser.add_argument("--time-limit", metavar="DURATION", help="stop at the first checkpoint (train.checkpoint_every "
                        "steps, or an epoch's end) or fold boundary after this long, e.g. 2h or 45m; finished folds "
                        "are kept and a rerun continues")
    parser.add_argument("--seeds", type=int, metavar="N", help="a seed bag: the run under N seeds on the same folds "
                        "(<run>, <run>-s1, ...); the same as --set run.seeds=N")
    args = parser.parse_args(argv)
    if args.pseudo:
        args.set.append(f"train.pseudo_run={args.pseudo}")
    if args.seeds is not None:
        args.set.append(f"run.seeds={args.seeds}")
    return run_cli(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    d = distributed.from_env()  # under torchrun: this process's rank in a DDP job
    if getattr(args, "time_limit", None):
        if d.enabled:
            raise CompError("--time-limit stops one process at its checkpoint: under torchrun drop it")
        args.deadline = time.monotonic() + cli.duration(args.time_limit)
    try:
        bag = cli.load_config(argparse.Namespace(**{**vars(args), "quiet": True})).bag()
        for member in bag:  # one run, or each seed of the bag in turn
            sets = [f"run.name={member.run.name}", f"train.seed={member.train.seed}", "run.seeds=1"] \
                if len(bag) > 1 else []  # each member alone (fold processes of --jobs/--devices included)
            _train(argparse.Namespace(**{**vars(args), "set": [*args.set, *sets]}), d)
        return 0
    finally:
        distributed.close(d)


def _train(args: argparse.Namespace, d: distributed.Dist) -> int:
    if not d.is_main:
        args.quiet = True  # rank 0 speaks and writes for the job
    cfg = cli.load_config(args)
    if cfg.model.kind == "encoder":
        optimizer_class(cfg.train)  # an optimizer that cannot load is refused before anything is written
        check_quantize(cfg.model, resolve_device(cfg.train))  # so is k-bit on a CPU
        check_packing(cfg.model, cfg.train, cfg.root)  # and packing that would drop a sliding window
    n = cfg.folds.n_splits
    if args.fold is not None and not 0 <= args.fold < n:
        raise CompError(f"--fold {args.fold} is out of range: folds.n_splits is {n}, so folds are 0..{n - 1}")
    if args.jobs < 1:
        raise CompError(f"--jobs {args.jobs}: must be at least 1")
    if getattr(args, "deadline", None) is not None and (args.devices or args.jobs > 1):
        raise CompError("--time-limit stops the folds of this process: drop --devices / --jobs, or the time limit")
    if d.enabled and (args.devices or args.jobs > 1):
        raise CompError("--devices / --jobs run one fold per process; under torchrun every process trains the same "
                        "fold: drop them (or drop torchrun)")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    console = cli.console(args.quiet)
    if devices and not torch.cuda.is_available():
        console.print("no CUDA GPU is visible: --devices is ignored and the folds run in turn")
        devices = None
    comp = load_competition(cfg)
    folds, folds_fp = load_folds(cfg, comp)
    if args.full:
        return refit(cfg, comp, args, console, d)
    todo = list(range(n)) if args.all else [args.fold]
    skipped = [k for k in todo if is_complete(cfg, k) and not args.force]
    now = identity.content(cfg, comp) if skipped else {}
    for k in skipped:
        why = stale(cfg, k, verify_fold(cfg, k), folds_fp, now)
        if why:
            raise CompError(f"fold {k} is already trained, but {why}: pass --force to retrain it, or set another "
                            "run.name to keep both")
        console.print(f"fold {k} of run {cfg.run.name!r} is already trained; skipping (use --force to retrain)")
    todo = [k for k in todo if k not in skipped]
    d.barrier()  # every rank has decided what to train before rank 0 starts replacing files
    if not todo:
        return 0
    if cfg.model.kind != "encoder":
        if d.enabled or devices or args.jobs > 1:
            raise CompError(f"model.kind = {cfg.model.kind!r} fits on the CPU in one process: drop torchrun, "
                            "--devices and --jobs")
        tokens, counts = None, Counts()
    else:
        tokens = tokenize_tables(cfg, comp, console, d)
    if len(todo) > 1 and (devices or args.jobs > 1):
        failed = run_folds(cfg, args, todo, make_slots(devices, args.jobs), console)
        if failed:
            raise CompError(f"fold(s) {failed} failed (see the lines above); rerun python -m comp.train --all "
                            "to continue them")
        return 0
    deadline = getattr(args, "deadline", None)
    for k in todo:
        if deadline is not None and time.monotonic() > deadline:
            raise OutOfTime(f"the time limit was reached before fold {k} of run {cfg.run.name!r}: the finished folds "
                            "are kept; rerun the command to continue")
        console.start_log()
        if cfg.model.kind == "encoder":
            distill = teacher_outputs(cfg, comp, folds, folds_fp, k, console)
            record = train_fold(cfg, comp, folds, folds_fp, k, tokens, console, fresh=args.force, d=d, distill=distill,
                                deadline=deadline)
        else:
            record = train_classical_fold(cfg, comp, folds, folds_fp, k, console, counts)
        b, swa = record["best"], record.get("swa")
        averaged = "" if not swa else (f" (train.swa: weights averaged over epochs {', '.join(map(str, swa['epochs']))})"
                                       if swa["kept"] else " (train.swa: no average validated better)")
        console.print(f"fold {k} done in {record['seconds']:.0f}s: best epoch {record['best_epoch']}{averaged}, "
                      f"{metrics.row_line(b)} -> {cfg.fold_dir(k)}")
        log = console.take_log()
        if d.is_main:
            write_text(cfg.fold_dir(k) / "train.log", log)
    return 0


def refit(cfg: Config, comp: Competition, args: argparse.Namespace, console, d: distributed.Dist) -> int:
    """comp.train --full: the refit on every training row, for --epochs or the median of the finished folds'
    best epochs (a gbm run's rounds; a linear run has none)."""
    key = {"encoder": "best_epoch", "gbm": "rounds"}.get(cfg.model.kind)
    if args.epochs is not None and (args.epochs < 1 or key is None):
        raise CompError(f"--epochs {args.epochs}: " + ("must be at least 1" if key else "a linear run has no epochs "
                        "or rounds to set: drop --epochs"))
    why = unrefittable(cfg)
    if why:
        raise CompError(f"{why}: drop --full (the run's submission is its folds' average)")
    epochs = args.epochs or (refit_epochs(cfg, key) if key else None)
    done = verify_fold(cfg, "full") if is_complete(cfg, "full") and not args.force else {}
    if done.get("epochs") == epochs and not stale(cfg, "full", done, now=identity.content(cfg, comp)):
        console.print(f"the refit of run {cfg.run.name!r} is already trained; skipping (use --force to retrain)")
        return 0
    tokens = tokenize_tables(cfg, comp, console, d) if cfg.model.kind == "encoder" else None
    record = train_full(cfg, comp, epochs, tokens, console, fresh=args.force, d=d)
    console.print(f"refit of run {cfg.run.name!r} on {record['n_train']} rows"
                  + (f", {epochs} {'epochs' if key == 'best_epoch' else 'rounds'}" if epochs else "")
                  + f", done in {record['seconds']:.0f}s -> {cfg.full_dir}")
    return 0


def refit_epochs(cfg: Config, key: str) -> int:
    """The median over the run's finished folds of their best epoch (gbm: rounds), what --full trains for."""
    records = []
    for k in range(cfg.folds.n_splits):
        if not is_complete(cfg, k):
            raise CompError(f"--full takes its epochs from the run's folds, and fold {k} of run {cfg.run.name!r} is "
                            "not finished: train the folds first (python -m comp.train --all), or pass --epochs N")
        records.append(verify_fold(cfg, k))
    return int(np.median([r[key] for r in records]))


def teacher_outputs(cfg: Config, comp: Competition, folds: np.ndarray, folds_fp: str, fold: int,
                    console) -> Distill | None:
    """train.teacher's soft targets for fold `fold`'s training rows: what the teacher's own fold `fold` model
    predicts for them. That model never saw this fold's validation rows, so the student's CV stays honest (the
    teacher's out-of-fold outputs for these rows came from its other folds' models, which trained on this
    fold's validation rows)."""
    name = cfg.train.teacher
    if not name:
        return None
    teacher, record = teacher_fold(cfg, "teacher", fold, folds_fp, comp.classes)
    own = read_config(teacher.fold_dir(fold) / "config.toml", cfg.root, record)  # the teacher's model and text
    if "content" in record and identity.changed(record["content"], {"model": identity.model_digest(own)}, own):
        raise CompError(f"train.teacher {name!r}: its model {own.model.name_or_path!r} changed since it trained: "
                        "retrain the teacher, or restore its model")
    seen = load_competition(own, with_test=False)
    if not np.array_equal(seen.train_ids, comp.train_ids):
        raise CompError(f"train.teacher {name!r} reads other training rows (data.train or data.train_rows differ): "
                        "retrain it on this run's rows")
    tr = np.flatnonzero(folds != fold)
    started = time.perf_counter()
    predictor = fold_predictor(FoldModel(own, teacher.fold_dir(fold), record["classes"]), None)
    logits = predictor(seen.train.iloc[tr].reset_index(drop=True), [seen.train_text[i] for i in tr], console)
    console.print(f"fold {fold}: soft targets for {len(tr)} training rows from fold {fold} of run {name!r} "
                  f"in {time.perf_counter() - started:.0f}s (weight {cfg.train.distill_weight}, "
                  f"temperature {cfg.train.temperature})")
    return Distill(logits, {"from": name, "weight": cfg.train.distill_weight, "temperature": cfg.train.temperature,
                            "teacher_sha256": record["sha256"]["test_logits.npy"]})


if __name__ == "__main__":
    sys.exit(main())
