"""A run's per-fold artifacts: train a fold and write them atomically; read and check them back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from comp import __version__, identity, metrics
from comp.artifacts import atomic_path, read_npy, sha256, write_json, write_npy, write_text
from comp.baselines import fit_classical
from comp.config import Config, to_toml
from comp.data import Competition
from comp.distributed import SINGLE, Dist
from comp.engine import Checkpoint, Rows, fit_fold, seed_everything
from comp.errors import CompError
from comp.features import MetaEncoder
from comp.model import build_model
from comp.outputs import checked_files, is_complete, split, verify_fold


@dataclass
class Pseudo:
    """Test rows a teacher run labelled confidently, added to one fold's training part."""

    index: np.ndarray      # test row positions
    labels: np.ndarray     # class indices
    record: dict           # what metrics.json says about them


def pseudo_labels(cfg: Config, comp: Competition, folds_fp: str, fold: int) -> Pseudo | None:
    """train.pseudo_run's confident test predictions for this fold: only the teacher's own fold `fold`
    model is asked, the one model of that run that never saw this fold's validation rows (the fold
    average would carry them into the training part and flatter the CV)."""
    name = cfg.train.pseudo_run
    if not name:
        return None
    if name == cfg.run.name:
        raise CompError(f"train.pseudo_run names this run ({name!r}): name the finished run to take labels from "
                        "and give this one another run.name")
    teacher = cfg.replace("run", name=name)
    if not is_complete(teacher, fold):
        raise CompError(f"train.pseudo_run {name!r} has no finished fold {fold} ({teacher.fold_dir(fold)}): train "
                        f"that run first (python -m comp.train --all --set run.name={name} ...)")
    record = verify_fold(teacher, fold)
    if record.get("folds_fingerprint") != folds_fp or record.get("classes") != comp.classes:
        raise CompError(f"train.pseudo_run {name!r} was trained on another split or other classes: retrain it on "
                        "the current folds, or pick another run")
    ids, logits = read_npy(teacher.fold_dir(fold) / "test_ids.npy"), read_npy(teacher.fold_dir(fold) / "test_logits.npy")
    if not np.array_equal(ids, comp.test_ids):
        raise CompError(f"train.pseudo_run {name!r} predicted another test table: retrain it on the current one")
    probs = metrics.probabilities(logits)
    index = np.flatnonzero(probs.max(1) >= cfg.train.pseudo_threshold)
    labels = probs[index].argmax(1)
    counts = np.bincount(labels, minlength=len(comp.classes))
    return Pseudo(index, labels, {"from": name, "threshold": cfg.train.pseudo_threshold, "rows": int(len(index)),
                                  "per_class": {str(c): int(n) for c, n in zip(comp.classes, counts, strict=True)},
                                  "teacher_sha256": record["sha256"]["test_logits.npy"]})


def prepare_fold(cfg: Config, comp: Competition, folds: np.ndarray, fold: int, train_tokens: list[np.ndarray],
                 test_tokens: list[np.ndarray] | None, train_fraction: float = 1.0, pseudo: Pseudo | None = None):
    """The fold's metadata encoder (fitted on its training part only) and its train / validation / test rows.
    train_fraction < 1 keeps a seeded stratified share of the training part (tuning uses it); `pseudo`
    rows (test rows with a teacher's labels) join the training part only."""
    tr, va = split(folds, fold)
    if train_fraction < 1.0:
        keep = max(len(comp.classes), int(round(train_fraction * len(tr))))
        tr, _ = train_test_split(tr, train_size=keep, random_state=cfg.folds.seed + fold, stratify=comp.y[tr])
        tr = np.sort(tr)
    encoder = MetaEncoder.from_config(cfg).fit(comp.train.iloc[tr])
    rows = Rows(train_tokens, np.zeros((len(train_tokens), 0), np.float32), comp.y)
    train_rows = rows.subset(tr, encoder.transform(comp.train.iloc[tr]))
    val_rows = rows.subset(va, encoder.transform(comp.train.iloc[va]))
    test_rows = None if test_tokens is None else Rows(test_tokens, encoder.transform(comp.test))
    if pseudo is not None and len(pseudo.index):
        extra = comp.test.iloc[pseudo.index]
        train_rows = train_rows + Rows([test_tokens[i] for i in pseudo.index], encoder.transform(extra), pseudo.labels)
    return encoder, train_rows, val_rows, test_rows


def checkpoint_identity(cfg: Config, comp: Competition, fold: int, folds_fp: str, d: Dist = SINGLE) -> dict:
    """What a resume checkpoint must match: the config, the inputs' content, the fold, the split and the number
    of processes (another world size draws another batch list, so its epoch starts over)."""
    return {"config_hash": cfg.hash(), "content": identity.content(cfg, comp), "fold": fold,
            "folds_fingerprint": folds_fp, "processes": d.world}


def train_fold(cfg: Config, comp: Competition, folds: np.ndarray, folds_fp: str, fold: int,
               train_tokens: list[np.ndarray], test_tokens: list[np.ndarray], pad_id: int, console: Console,
               fresh: bool = False, d: Dist = SINGLE) -> dict:
    """Fit the metadata encoders and the model on one fold (resuming its `last` checkpoint unless `fresh`),
    then write every artifact of that fold (under DDP: every rank trains, rank 0 writes)."""
    out = cfg.fold_dir(fold)
    checkpoint = Checkpoint(out / "last.pt", checkpoint_identity(cfg, comp, fold, folds_fp, d))
    if d.is_main:
        (out / "metrics.json").unlink(missing_ok=True)  # the fold is unfinished until metrics.json is rewritten
        if fresh:
            checkpoint.delete()
    d.barrier()
    pseudo = pseudo_labels(cfg, comp, folds_fp, fold)
    encoder, train_rows, val_rows, test_rows = prepare_fold(cfg, comp, folds, fold, train_tokens, test_tokens,
                                                            pseudo=pseudo)
    tr, va = split(folds, fold)
    if pseudo is not None:
        console.print(f"fold {fold}: +{pseudo.record['rows']} pseudo-labelled test rows from run {pseudo.record['from']!r} "
                      f"(probability >= {pseudo.record['threshold']}): "
                      + ", ".join(f"{c} {n}" for c, n in pseudo.record["per_class"].items()))
    unseen = encoder.unseen(comp.test)
    if any(unseen.values()):
        console.print(f"fold {fold}: test rows with categories unseen in training (rare column, or zeros): "
                      + ", ".join(f"{c} {n}" for c, n in unseen.items() if n))
    seed_everything(cfg.train.seed + fold)  # the head's initial weights are part of the run
    model = build_model(cfg.model, encoder.width, len(comp.classes), root=cfg.root)
    console.print(f"fold {fold}: {len(tr)} train rows, {len(va)} validation rows, {len(test_rows)} test rows, "
                  f"{encoder.width} metadata features" + (f", {d.world} processes (DDP)" if d.enabled else ""))
    result = fit_fold(cfg, model, train_rows, val_rows, test_rows, pad_id, console, fold, checkpoint, d=d)
    record = {"status": "complete", "run": cfg.run.name, "fold": fold, "best_epoch": result.best_epoch,
              "best": result.history[result.best_epoch - 1], "history": result.history,
              "monitor": cfg.train.monitor, "config_hash": cfg.hash(), "folds_fingerprint": folds_fp,
              "model": cfg.model.name_or_path, "comp_version": __version__, "torch_version": torch.__version__,
              "classes": comp.classes, "n_train": len(tr), "n_val": len(va), "n_test": len(test_rows),
              "processes": d.world, "pseudo": pseudo.record if pseudo else None, "unseen_categories": unseen,
              "oof": metrics.score(comp.y[va], result.val_logits),
              "seconds": round(result.seconds, 1), "resumed_from": result.resumed_from}
    if not d.is_main:
        d.barrier()  # rank 0 writes
        return record

    def write_model(out):
        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(tmp))
        encoder.save(out / "encoders.json")

    write_fold(cfg, comp, va, fold, record, write_model, result.val_logits, result.test_logits)
    checkpoint.delete()
    d.barrier()
    return record


def write_fold(cfg: Config, comp: Competition, va: np.ndarray, fold: int, record: dict,
               write_model: Callable[[Path], None], val_logits: np.ndarray, test_logits: np.ndarray) -> None:
    """Write a fold's model files, OOF and test logits and config, then metrics.json (last, with the sha256
    of every checked file): the fold counts as finished only once that is in place."""
    out = cfg.fold_dir(fold)
    write_model(out)
    write_npy(out / "oof_logits.npy", val_logits)
    write_npy(out / "oof_ids.npy", comp.train_ids[va])
    write_npy(out / "test_logits.npy", test_logits)
    write_npy(out / "test_ids.npy", comp.test_ids)
    write_text(out / "config.toml", to_toml(cfg))
    record.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), kind=cfg.model.kind, content=identity.content(cfg, comp),
                  sha256={name: sha256(out / name) for name in checked_files(cfg.model.kind)})
    write_json(out / "metrics.json", record)


def train_classical_fold(cfg: Config, comp: Competition, folds: np.ndarray, folds_fp: str, fold: int,
                         console: Console) -> dict:
    """Fit a linear or gbm run on one fold's training rows; write the same artifacts as an encoder fold."""
    out = cfg.fold_dir(fold)
    (out / "metrics.json").unlink(missing_ok=True)
    started = time.perf_counter()
    tr, va = split(folds, fold)
    text = np.array(comp.train_text, dtype=object)
    model = fit_classical(cfg, comp.train.iloc[tr], list(text[tr]), comp.y[tr], len(comp.classes), cfg.train.seed + fold)
    val_logits = model.logits(comp.train.iloc[va], list(text[va]))
    test_logits = model.logits(comp.test, comp.test_text)
    scores = metrics.score(comp.y[va], val_logits)
    best = {"epoch": 0, "val_loss": scores["log_loss"], "val_accuracy": scores["accuracy"],
            "val_macro_f1": scores["macro_f1"]}
    record = {"status": "complete", "run": cfg.run.name, "fold": fold, "best_epoch": 0, "best": best, "history": [],
              "monitor": cfg.train.monitor, "config_hash": cfg.hash(), "folds_fingerprint": folds_fp,
              "model": cfg.model.kind, "comp_version": __version__, "classes": comp.classes, "n_train": len(tr),
              "n_val": len(va), "n_test": len(comp.test), "processes": 1, "pseudo": None, "oof": scores,
              "seconds": round(time.perf_counter() - started, 1), "resumed_from": None}

    write_fold(cfg, comp, va, fold, record, model.save, val_logits, test_logits)
    console.print(f"fold {fold} ({cfg.model.kind}): {len(tr)} train rows, {len(va)} validation rows")
    return record


