"""A run's per-fold artifacts: train a fold and write them atomically; read and check them back."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file

from comp import __version__, metrics
from comp.artifacts import atomic_path, read_npy, sha256, write_json, write_npy, write_text
from comp.classical.baselines import fit_classical, subsample
from comp.classical.text import Counts
from comp.config import Config, to_toml
from comp.errors import CompError
from comp.nn.batching import Rows, Truncation, cached_tokenize
from comp.nn.distributed import SINGLE, Dist
from comp.nn.engine import Fold, FoldResult, fit_fold
from comp.nn.hardware import resolve_device, resolve_precision
from comp.nn.loop import make_progress
from comp.nn.model import build_model, load_tokenizer, pad_id
from comp.nn.state import Checkpoint, seed_everything
from comp.outputs.collect import checked_files, fold_path, refit_config, split, teacher_fold
from comp.tables import identity
from comp.tables.features import MetaEncoder
from comp.tables.read import Competition


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
    teacher, record = teacher_fold(cfg, "pseudo_run", fold, folds_fp, comp.classes)
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


@dataclass
class Distill:
    """A teacher run's outputs for one fold's training rows (train.teacher), and what metrics.json says of them."""

    logits: np.ndarray
    record: dict


@dataclass
class Tokens:
    """The token ids of the training texts (and of the test texts, when they are to be predicted) under a
    config's tokenizer, and its padding id."""

    train: list[np.ndarray]
    test: list[np.ndarray] | None
    pad_id: int
    sep_id: int | None = None


def tokenize_tables(cfg: Config, comp: Competition, console: Console, d: Dist = SINGLE,
                    with_test: bool = True) -> Tokens:
    """The config's tokenizer over the tables' texts, through the token cache (under DDP rank 0 fills it, the
    others read it). Every stage that trains tokenizes here, so tokens always follow the config being trained
    (a tuning trial's max_length or model included)."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    tables = [comp.train_text] + ([comp.test_text] if with_test else [])
    for turn in (True, False) if d.enabled else (True,):
        if d.is_main == turn:
            with make_progress(console) as progress:
                done = [cached_tokenize(tokenizer, texts, Truncation.of(cfg.model), cfg.cache_dir, progress)
                        for texts in tables]
        d.barrier()
    how = "from the cache" if all(hit for _, hit in done) else "tokenized"
    console.print(f"{len(comp.train_text)} train" + (f" and {len(comp.test_text)} test" if with_test else "")
                  + f" rows {how} in {time.perf_counter() - t0:.1f}s")
    return Tokens(done[0][0], done[1][0] if with_test else None, pad_id(tokenizer), tokenizer.sep_token_id)


def prepare_fold(cfg: Config, comp: Competition, tr: np.ndarray, va: np.ndarray, tokens: Tokens,
                 pseudo: Pseudo | None = None, soft: np.ndarray | None = None) -> tuple[MetaEncoder, Rows, Rows, Rows | None]:
    """The metadata encoder (fitted on the training part only) and the train / validation / test rows of a
    split of the training table; `pseudo` rows (test rows with a teacher's labels) join the training part;
    `soft`: a distilled teacher's outputs for the training part's rows, in their order."""
    encoder = MetaEncoder.from_config(cfg).fit(comp.train.iloc[tr])
    rows = Rows(tokens.train, np.zeros((len(tokens.train), 0), np.float32), comp.y)
    train_rows = rows.subset(tr, encoder.transform(comp.train.iloc[tr]))
    val_rows = rows.subset(va, encoder.transform(comp.train.iloc[va]))
    test_rows = None if tokens.test is None else Rows(tokens.test, encoder.transform(comp.test))
    if pseudo is not None and len(pseudo.index):
        extra = comp.test.iloc[pseudo.index]
        train_rows = train_rows + Rows([tokens.test[i] for i in pseudo.index], encoder.transform(extra), pseudo.labels)
    if soft is not None:
        train_rows = dataclasses.replace(train_rows, soft=soft.astype(np.float32))
    return encoder, train_rows, val_rows, test_rows


def training_part(cfg: Config, comp: Competition, tr: np.ndarray, index: int) -> np.ndarray:
    """Positions in `tr` of the training rows that train a fold: all of them, or a sample of train.max_rows
    (stratified on the class for single_label, seeded by the fold) where there are more."""
    n = cfg.train.max_rows
    if not n or len(tr) <= n:
        return np.arange(len(tr))
    if cfg.data.task == metrics.SINGLE:
        return subsample(comp.y[tr], n, cfg.train.seed + index)
    return np.sort(np.random.default_rng(cfg.train.seed + index).permutation(len(tr))[:n])


def fit_split(cfg: Config, comp: Competition, part: tuple[np.ndarray, np.ndarray], index: int, tokens: Tokens,
              console: Console, pseudo: Pseudo | None = None, checkpoint: Checkpoint | None = None,
              on_epoch=None, d: Dist = SINGLE, soft: np.ndarray | None = None) -> tuple[MetaEncoder, FoldResult]:
    """The one wiring of a fold, for train, tune and bench: rows and metadata encoder from the split `part`
    (training rows, validation rows; train.max_rows of the training rows, where set), the model seeded by the fold's
    `index`, then fit_fold."""
    keep = training_part(cfg, comp, part[0], index)
    part, soft = (part[0][keep], part[1]), None if soft is None else soft[keep]
    encoder, train_rows, val_rows, test_rows = prepare_fold(cfg, comp, *part, tokens, pseudo, soft)
    seed_everything(cfg.train.seed + index)  # the head's initial weights are part of the run
    model = build_model(cfg.model, encoder.width, len(comp.classes), root=cfg.root, task=cfg.data.task,
                        pair_sep=tokens.sep_id if cfg.data.text_pair else None, tcfg=cfg.train)
    console.print(f"fold {index}: {len(part[0])} train rows, {len(part[1])} validation rows, "
                  f"{0 if test_rows is None else len(test_rows)} test rows, {encoder.width} metadata features"
                  + (f", {d.world} processes (DDP)" if d.enabled else ""))
    fold = Fold(index, train_rows, val_rows, test_rows, tokens.pad_id, checkpoint, on_epoch)
    return encoder, fit_fold(cfg, model, fold, console, d)


def checkpoint_identity(cfg: Config, comp: Competition, fold: int, folds_fp: str, d: Dist = SINGLE) -> dict:
    """What a resume checkpoint must match: the config, the inputs' content, the fold, the split and the number
    of processes (another world size draws another batch list, so its epoch starts over)."""
    return {"config_hash": cfg.hash(), "content": identity.content(cfg, comp), "fold": fold,
            "folds_fingerprint": folds_fp, "processes": d.world, "precision": precision_name(cfg)}


def precision_name(cfg: Config) -> str:
    """What train.precision resolves to on this machine for train.device ("auto" differs between machines)."""
    dtype = resolve_precision(cfg.train, resolve_device(cfg.train))
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def train_fold(cfg: Config, comp: Competition, folds: np.ndarray, folds_fp: str, fold: int, tokens: Tokens,
               console: Console, fresh: bool = False, d: Dist = SINGLE, distill: Distill | None = None,
               deadline: float | None = None) -> dict:
    """Fit the metadata encoders and the model on one fold (resuming its `last` checkpoint unless `fresh`),
    then write every artifact of that fold (under DDP: every rank trains, rank 0 writes). `distill`: the
    teacher's soft targets for this fold's training rows (train.teacher); `deadline` (time.monotonic()): the
    first checkpoint after it stops the fold (OutOfTime)."""
    out = cfg.fold_dir(fold)
    checkpoint = Checkpoint(out / "last.pt", checkpoint_identity(cfg, comp, fold, folds_fp, d), deadline=deadline)
    if d.is_main:
        (out / "metrics.json").unlink(missing_ok=True)  # the fold is unfinished until metrics.json is rewritten
        if fresh:
            checkpoint.delete()
    d.barrier()
    pseudo = pseudo_labels(cfg, comp, folds_fp, fold)
    if pseudo is not None:
        console.print(f"fold {fold}: +{pseudo.record['rows']} pseudo-labelled test rows from run {pseudo.record['from']!r} "
                      f"(probability >= {pseudo.record['threshold']}): "
                      + ", ".join(f"{c} {n}" for c, n in pseudo.record["per_class"].items()))
    tr, va = split(folds, fold)
    encoder, result = fit_split(cfg, comp, (tr, va), fold, tokens, console, pseudo, checkpoint, d=d,
                                soft=distill.logits if distill else None)
    unseen = encoder.unseen(comp.test)
    if any(unseen.values()):
        console.print(f"fold {fold}: test rows with categories unseen in training (rare column, or zeros): "
                      + ", ".join(f"{c} {n}" for c, n in unseen.items() if n))
    record = {"status": "complete", "run": cfg.run.name, "fold": fold, "best_epoch": result.best_epoch,
              "best": result.best_row, "history": result.history, "swa": result.swa,
              "monitor": cfg.train.monitor, "config_hash": cfg.hash(), "folds_fingerprint": folds_fp,
              "model": cfg.model.name_or_path, "comp_version": __version__, "torch_version": torch.__version__,
              "classes": comp.classes, "n_train": len(training_part(cfg, comp, tr, fold)), "n_val": len(va),
              "n_test": len(comp.test),
              "processes": d.world, "precision": precision_name(cfg), "pseudo": pseudo.record if pseudo else None,
              "distill": distill.record if distill else None, "packing": result.packing,
              "unseen_categories": unseen,
              "task": cfg.data.task, "oof": metrics.score(comp.y[va], result.val_logits, cfg.data.task),
              "seconds": round(result.seconds, 1), "resumed_from": result.resumed_from}
    if not d.is_main:
        d.barrier()  # rank 0 writes
        return record

    write_fold(cfg, comp, fold, record, encoder_writer(result, encoder), result.test_logits, va, result.val_logits)
    checkpoint.delete()
    d.barrier()
    return record


def encoder_writer(result: FoldResult, encoder: MetaEncoder) -> Callable[[Path], None]:
    """What writes an encoder fold's model files: its trained state (safetensors) and metadata encoders."""

    def write_model(out: Path) -> None:
        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(tmp))
        encoder.save(out / "encoders.json")

    return write_model


def write_fold(cfg: Config, comp: Competition, fold: int | str, record: dict, write_model: Callable[[Path], None],
               test_logits: np.ndarray, va: np.ndarray | None = None, val_logits: np.ndarray | None = None) -> None:
    """Write a fold's model files, OOF (a refit, fold "full": none) and test logits and config, then
    metrics.json (last, with the sha256 of every checked file): the fold counts as finished only once that is
    in place."""
    out = fold_path(cfg, fold)
    write_model(out)
    if va is not None:
        write_npy(out / "oof_logits.npy", val_logits)
        write_npy(out / "oof_ids.npy", comp.train_ids[va])
    write_npy(out / "test_logits.npy", test_logits)
    write_npy(out / "test_ids.npy", comp.test_ids)
    write_text(out / "config.toml", to_toml(cfg))
    record.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), kind=cfg.model.kind, content=identity.content(cfg, comp),
                  sha256={name: sha256(out / name) for name in checked_files(cfg.model.kind, full=va is None)})
    write_json(out / "metrics.json", record)


def train_full(cfg: Config, comp: Competition, epochs: int, tokens: Tokens | None, console: Console,
               fresh: bool = False, d: Dist = SINGLE) -> dict:
    """The full-data refit: the run's model trained on every training row, with no validation rows and no
    early stopping, for `epochs` epochs (a gbm run: that many rounds); writes its test outputs (no OOF rows)
    under the run's full/ folder, metrics.json last."""
    out, started = cfg.full_dir, time.perf_counter()
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # unfinished until metrics.json is rewritten
    every = np.arange(len(comp.y))
    seed = cfg.train.seed + cfg.folds.n_splits  # a stream of its own, after the folds'
    cfg = refit_config(cfg, epochs)
    if cfg.model.kind == "encoder":
        checkpoint = Checkpoint(out / "last.pt", checkpoint_identity(cfg, comp, -1, "full", d))
        if fresh and d.is_main:
            checkpoint.delete()
        encoder, train_rows, _, test_rows = prepare_fold(cfg, comp, every, every[:0], tokens)
        seed_everything(seed)
        model = build_model(cfg.model, encoder.width, len(comp.classes), root=cfg.root, task=cfg.data.task,
                            pair_sep=tokens.sep_id if cfg.data.text_pair else None, tcfg=cfg.train)
        result = fit_fold(cfg, model, Fold(cfg.folds.n_splits, train_rows, None, test_rows, tokens.pad_id, checkpoint),
                          console, d)
        test_logits, write_model = result.test_logits, encoder_writer(result, encoder)
    else:
        model = fit_classical(cfg, comp.train, list(comp.train_text), comp.y, len(comp.classes), seed,
                              say=lambda message: console.print(f"refit ({cfg.model.kind}): {message}"))
        test_logits, write_model = model.logits(comp.test, comp.test_text), model.save
    record = {"status": "complete", "run": cfg.run.name, "fold": "full", "epochs": epochs, "oof": None,
              "config_hash": cfg.hash(), "model": cfg.model.name_or_path, "comp_version": __version__,
              "classes": comp.classes, "task": cfg.data.task, "n_train": len(every), "n_test": len(comp.test),
              "processes": d.world, "seconds": round(time.perf_counter() - started, 1),
              "precision": precision_name(cfg) if cfg.model.kind == "encoder" else None,
              "packing": result.packing if cfg.model.kind == "encoder" else None}
    if d.is_main:
        write_fold(cfg, comp, "full", record, write_model, test_logits)
        if cfg.model.kind == "encoder":
            checkpoint.delete()
    d.barrier()
    return record


def classical_row(scores: dict) -> dict:
    """A classical fold's one row of validation scores, named as an encoder epoch's (val_loss: the log loss, or
    for regression the mean squared error)."""
    loss = scores["log_loss"] if "log_loss" in scores else scores["rmse"] ** 2
    return {"epoch": 0, "val_loss": loss, **metrics.validation_row(scores)}


def train_classical_fold(cfg: Config, comp: Competition, folds: np.ndarray, folds_fp: str, fold: int,
                         console: Console, counts: Counts | None = None) -> dict:
    """Fit a linear or gbm run on one fold's training rows; write the same artifacts as an encoder fold.
    `counts`: the n-gram counts of the table's texts, which the folds share."""
    out = cfg.fold_dir(fold)
    (out / "metrics.json").unlink(missing_ok=True)
    started = time.perf_counter()
    tr, va = split(folds, fold)
    text = np.array(comp.train_text, dtype=object)
    model = fit_classical(cfg, comp.train.iloc[tr], list(text[tr]), comp.y[tr], len(comp.classes), cfg.train.seed + fold,
                          valid=(comp.train.iloc[va], list(text[va]), comp.y[va]),
                          say=lambda message: console.print(f"fold {fold} ({cfg.model.kind}): {message}"), counts=counts)
    val_logits = model.logits(comp.train.iloc[va], list(text[va]))
    test_logits = model.logits(comp.test, comp.test_text)
    scores = metrics.score(comp.y[va], val_logits, cfg.data.task)
    best = classical_row(scores)
    record = {"status": "complete", "run": cfg.run.name, "fold": fold, "best_epoch": 0, "best": best, "history": [],
              "monitor": cfg.train.monitor, "config_hash": cfg.hash(), "folds_fingerprint": folds_fp,
              "model": cfg.model.kind, "comp_version": __version__, "classes": comp.classes, "task": cfg.data.task,
              "n_train": len(tr),
              "n_val": len(va), "n_test": len(comp.test), "processes": 1, "pseudo": None, "oof": scores,
              "seconds": round(time.perf_counter() - started, 1), "resumed_from": None}

    text, linear = model.model.spec, cfg.model.kind == "linear"
    record["tfidf"] = {**text, "C": model.model.c} if linear else text
    if not linear:
        record["rounds"] = model.model.rounds
    write_fold(cfg, comp, fold, record, model.save, test_logits, va, val_logits)
    char = f" (char {text['char_ngrams'][0]}-{text['char_ngrams'][1]})" if "char" in text["analyzer"] else ""
    how = (f"; TF-IDF {text['analyzer']}{char}"
           + (f", C {model.model.c:g}" if linear else f", {model.model.rounds} rounds"))
    console.print(f"fold {fold} ({cfg.model.kind}): {len(tr)} train rows, {len(va)} validation rows{how}")
    return record


