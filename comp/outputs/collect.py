"""The one way out of the folds: read and verify a run's fold outputs, assemble its OOF logits, average its
test probabilities, and shape a submission. submit, blend, report and predict read fold outputs through here."""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from comp import config, metrics
from comp.artifacts import read_json, read_npy, sha256
from comp.config import Config
from comp.errors import CompError
from comp.tables import identity
from comp.tables.read import Competition, load_competition, read_table, targets
from comp.tables.splits import load_folds

OUTPUTS = ("oof_logits.npy", "oof_ids.npy", "test_logits.npy", "test_ids.npy")
MODEL_FILES = {"encoder": ("model.safetensors", "encoders.json"), "linear": ("linear.json", "linear.safetensors"),
               "gbm": ("gbm.json", "gbm.safetensors", "gbm.txt")}


def checked_files(kind: str, full: bool = False) -> tuple[str, ...]:
    """The files of a finished fold whose sha256 metrics.json records: the model's, then the outputs (a
    full-data refit has no OOF rows: its test outputs only)."""
    return (*MODEL_FILES[kind], *(OUTPUTS[2:] if full else OUTPUTS))


FILES = (*checked_files("encoder"), "config.toml", "metrics.json", "train.log")  # an encoder fold's folder


def fold_path(cfg: Config, fold: int | str) -> Path:
    """A fold's folder; fold "full": the run's refit (comp.train --full), as its record names it."""
    return cfg.full_dir if fold == "full" else cfg.fold_dir(fold)


def is_complete(cfg: Config, fold: int | str) -> bool:
    """A fold (or "full": the refit) is finished when its metrics.json (written last) says so."""
    path = fold_path(cfg, fold) / "metrics.json"
    return path.is_file() and read_json(path).get("status") == "complete"


def recorded_sums(cfg: Config, fold: int | str) -> dict | None:
    """The sha256 of each file a finished fold (or "full": the refit) recorded (None while it is unfinished)."""
    if not is_complete(cfg, fold):
        return None
    return read_json(fold_path(cfg, fold) / "metrics.json").get("sha256") or {}


def outputs_stamp(cfg: Config) -> str | None:
    """A digest of the OOF and test logits of every fold of cfg's run (the sha256 their records hold), which a
    rule or weights fitted on them record: None while a fold is unfinished."""
    folds = [recorded_sums(cfg, k) for k in range(cfg.folds.n_splits)]
    if any(sums is None for sums in folds):
        return None
    digests = [sums.get(name) for sums in folds for name in ("oof_logits.npy", "test_logits.npy")]
    return hashlib.sha256("|".join(map(str, digests)).encode()).hexdigest()[:16]


def stale_teacher(cfg: Config, record: dict) -> str | None:
    """Why a fold no longer matches the run it learned from (pseudo-labels or distillation): that run was
    retrained or removed since; None when it still matches."""
    fold = record.get("fold")
    for key, what in (("pseudo", "pseudo-label teacher"), ("distill", "distillation teacher (train.teacher)")):
        source = record.get(key)
        if not source:
            continue
        sums = recorded_sums(cfg.replace("run", name=source["from"]), fold)
        if sums is None or sums.get("test_logits.npy") != source.get("teacher_sha256"):
            return (f"the {what} run {source['from']!r} was retrained or removed after fold {fold} of run "
                    f"{cfg.run.name!r} learned from it")
    return None


def refit_config(cfg: Config, epochs: int | None) -> Config:
    """What a refit trains: the run's config with `epochs` epochs and no weight averaging (no validation rows to
    choose by), or for a gbm run `epochs` rounds; a linear run's as it is."""
    if cfg.model.kind == "encoder":
        return cfg.replace("train", epochs=epochs, swa="off")
    if cfg.model.kind == "gbm":
        return cfg.replace("model", gbm=dataclasses.replace(cfg.model.gbm, rounds=epochs))
    return cfg


def unrefittable(cfg: Config) -> str | None:
    """Why a run's folds learn what a refit on every row cannot: a teacher's outputs or pseudo-labels come from
    fold k's own teacher model, and the refit has no fold (None when a refit learns what its folds learned)."""
    for key in ("teacher", "pseudo_run"):
        if getattr(cfg.train, key):
            return (f"run {cfg.run.name!r} learns from train.{key} = {getattr(cfg.train, key)!r} fold by fold (each "
                    "fold from the teacher's own fold model), which a refit on every row cannot reproduce")
    return None


def stale(cfg: Config, fold: int | str, record: dict, folds_fp: str | None = None, now: dict | None = None,
          check_config: bool = True) -> str | None:
    """The one answer to why a finished fold (or "full": the refit) is no longer cfg's run's: another split of
    the folds, another config (unless check_config is off; a refit's is refit_config's), a teacher retrained
    since, or other inputs than `now` (identity.content: tables, model). None when it is still the run's."""
    what = f"{'the refit' if fold == 'full' else f'fold {fold}'} of run {cfg.run.name!r}"
    if folds_fp is not None and fold != "full" and record.get("folds_fingerprint") != folds_fp:
        return f"{what} was trained on another split of the folds"
    if check_config:
        expected = refit_config(cfg, record.get("epochs")) if fold == "full" else cfg
        if not config_matches(expected, record):
            return (f"{what} was trained with another config "
                    f"({trained_difference(expected, fold_path(cfg, fold) / 'config.toml')})")
    teacher = (unrefittable(cfg) if fold == "full" else None) or stale_teacher(cfg, record)
    if teacher:
        return teacher
    change = identity.changed(record.get("content"), now or {}, cfg)
    return f"{change} changed after {what} was trained" if change else None


def retrain(fold: int | str, run: bool = False) -> str:
    """The command that trains a fold (or "full": the refit) again; `run`: every fold of the run."""
    return ("python -m comp.train --full --force" if fold == "full" else
            "python -m comp.train --all --force" if run else f"python -m comp.train --fold {fold} --force")


def checked_record(cfg: Config, fold: int | str, folds_fp: str | None = None, now: dict | None = None,
                   check_config: bool = True) -> dict:
    """A finished fold's (or "full": the refit's) record, after checking its files against their recorded
    sha256 and that it is still the run's (stale); every reader of a fold or refit comes through here."""
    if not is_complete(cfg, fold):
        path = fold_path(cfg, fold) / "metrics.json"
        raise CompError(f"run {cfg.run.name!r} has no finished refit ({path} missing): train it with python -m "
                        "comp.train --full, or drop --with-full" if fold == "full" else
                        f"fold {fold} of run {cfg.run.name!r} is not trained ({path} missing): run python -m "
                        f"comp.train --fold {fold} (or --all)")
    record = verify_fold(cfg, fold)
    why = stale(cfg, fold, record, folds_fp, now, check_config)
    if why:
        fix = "drop --with-full" if fold == "full" and unrefittable(cfg) else \
            f"use the same config (and --params) and inputs as for training, or retrain with {retrain(fold, run=True)}"
        raise CompError(f"{why}: {fix}")
    return record


def split(folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a fold's training part and validation part (disjoint, together every row)."""
    return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)


def verify_fold(cfg: Config, fold: int | str) -> dict:
    """The fold's (or "full": the refit's) record, after checking every artifact against the checksum recorded
    when it was written."""
    out = fold_path(cfg, fold)
    record = read_json(out / "metrics.json")
    sums = record.get("sha256") or {}
    for name in checked_files(record.get("kind", "encoder"), full=fold == "full"):
        path = out / name
        if not path.is_file() or sums.get(name) != sha256(path):
            raise CompError(f"{path} is missing or does not match the checksum recorded when it was written "
                            f"(corrupted or replaced): retrain with {retrain(fold)}")
    return record


@dataclass
class FoldOutputs:
    """One finished fold's logits, ids and record."""

    fold: int
    record: dict
    oof_ids: np.ndarray
    oof_logits: np.ndarray
    test_ids: np.ndarray
    test_logits: np.ndarray


def config_matches(cfg: Config, record: dict) -> bool:
    """Whether a fold was trained with cfg's settings. Folds from before content records hashed the tables' and
    the model's path strings too, and are compared that way."""
    return record.get("config_hash") == cfg.hash(paths="content" not in record)


def read_config(path: Path, root: Path, record: dict | None = None) -> Config:
    """A resolved config a fold was trained with (its config.toml), checked against the hash its record holds."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise CompError(f"{path} is missing or unreadable: retrain that fold with --force") from None
    trained = config.from_dict(config.as_recorded(raw), root=root, source=str(path))
    if record is not None and not config_matches(trained, record):
        raise CompError(f"{path} does not match the config its fold recorded (altered?): retrain it with --force")
    return trained


def trained_difference(cfg: Config, path: Path) -> str:
    """How cfg differs from the config a fold was trained with (its config.toml), in words."""
    try:
        change = cfg.difference(read_config(path, cfg.root))
    except CompError:
        change = None
    hint = " (train.loss = \"auto\" follows data.metric)" if change and change.startswith("train.loss") else ""
    return f"{change}{hint}" if change else f"see {path}"


def read_fold(cfg: Config, fold: int, folds_fp: str, check_config: bool = True, now: dict | None = None) -> FoldOutputs:
    """Read a finished fold's outputs, refusing one that is missing, altered or stale (checked_record)."""
    out = cfg.fold_dir(fold)
    record = checked_record(cfg, fold, folds_fp, now, check_config)
    return FoldOutputs(fold, record, read_npy(out / "oof_ids.npy"), read_npy(out / "oof_logits.npy"),
                       read_npy(out / "test_ids.npy"), read_npy(out / "test_logits.npy"))


def read_full(cfg: Config, now: dict | None = None) -> dict:
    """The run's full-data refit (comp.train --full), checked like a fold (checked_record): finished, its files
    as recorded, trained with refit_config of cfg, its inputs (`now`) unchanged; returns its record."""
    return checked_record(cfg, "full", now=now)


def refit_test_logits(cfg: Config, comp: Competition, now: dict | None = None) -> tuple[dict, np.ndarray]:
    """The refit's record (read_full) and its test logits, checked against the current test table."""
    record = read_full(cfg, now)
    if not np.array_equal(read_npy(cfg.full_dir / "test_ids.npy"), comp.test_ids):
        raise CompError(f"the test table changed after the refit of run {cfg.run.name!r} was trained: retrain it "
                        "with python -m comp.train --full --force")
    return record, read_npy(cfg.full_dir / "test_logits.npy")


def teacher_fold(cfg: Config, key: str, fold: int, folds_fp: str, classes: list) -> tuple[Config, dict]:
    """The fold `fold` of the run a train.<key> names (pseudo_run, teacher), checked: finished, its files as
    recorded, on this split and these classes. Returns that run's config and the fold's record."""
    name = getattr(cfg.train, key)
    teacher = cfg.replace("run", name=name)
    if not is_complete(teacher, fold):
        raise CompError(f"train.{key} {name!r} has no finished fold {fold} ({teacher.fold_dir(fold)}): train that "
                        f"run first (python -m comp.train --all --set run.name={name} ...)")
    record = verify_fold(teacher, fold)
    if record.get("folds_fingerprint") != folds_fp or record.get("classes") != classes:
        raise CompError(f"train.{key} {name!r} was trained on another split or other classes: retrain it on the "
                        "current folds, or pick another run")
    return teacher, record


def assemble_oof(comp: Competition, folds: np.ndarray, outputs: list[FoldOutputs]) -> np.ndarray:
    """OOF logits in train-row order, after checking each fold predicted exactly its own validation rows."""
    oof = np.full((len(comp.train), len(comp.classes)), np.nan, dtype=np.float32)
    for out in outputs:
        _, va = split(folds, out.fold)
        if out.record.get("classes") != comp.classes:
            raise CompError(f"fold {out.fold} was trained with classes {out.record.get('classes')}, train now has "
                            f"{comp.classes}: retrain it with --force")
        if not np.array_equal(out.oof_ids, comp.train_ids[va]) or out.oof_logits.shape != (len(va), len(comp.classes)):
            raise CompError(f"fold {out.fold}'s OOF predictions do not cover its validation rows: "
                            f"retrain it with python -m comp.train --fold {out.fold} --force")
        oof[va] = out.oof_logits
    return oof


def load_run(cfg: Config) -> tuple[Competition, np.ndarray, str, list[FoldOutputs], np.ndarray]:
    """The tables, the checked split and its fingerprint, every finished fold of the run, and the OOF logits
    assembled in train-row order (refusing missing, stale or mixed folds)."""
    comp = load_competition(cfg)
    folds, folds_fp = load_folds(cfg, comp)
    now = identity.content(cfg, comp)
    outputs = [read_fold(cfg, k, folds_fp, now=now) for k in range(cfg.folds.n_splits)]
    return comp, folds, folds_fp, outputs, assemble_oof(comp, folds, outputs)


def fold_scores(cfg: Config, comp: Competition, folds: np.ndarray, outputs: list[FoldOutputs]) -> list[dict]:
    """Each fold's scores on its own validation rows."""
    return [metrics.score(comp.y[folds == o.fold], o.oof_logits, cfg.data.task) for o in outputs]


def average_probabilities(fold_logits: list[np.ndarray], task: str = metrics.SINGLE) -> np.ndarray:
    """Test predictions: the mean over folds of each fold's probabilities (softmax, sigmoid; not those of the
    mean logits) or values."""
    return np.mean([metrics.activate(task, lg) for lg in fold_logits], axis=0)


def test_logits_in_order(comp: Competition, outputs: list[FoldOutputs]) -> list[np.ndarray]:
    """Each fold's test logits, checked against the current test table's ids."""
    for out in outputs:
        if not np.array_equal(out.test_ids, comp.test_ids) or len(out.test_logits) != len(comp.test):
            raise CompError(f"the test table changed after fold {out.fold} was trained: "
                            f"retrain with python -m comp.train --all --force")
    return [out.test_logits for out in outputs]


def submission_frame(cfg: Config, comp: Competition, predictions: np.ndarray) -> pd.DataFrame:
    """The submission in the sample submission's format, its id order: one column per class / label / target
    (probabilities or values) where the sample has those columns; else its one answer column holds the class
    (labels as spelled in train; the positive class's probability for two classes scored on probabilities),
    the tags of probability >= 0.5 joined by data.label_separator, or the one target's value."""
    d = cfg.data
    by_id = pd.DataFrame(predictions, index=comp.test_ids, columns=comp.classes)
    sample = comp.sample if comp.sample is not None else pd.DataFrame({d.id: comp.test_ids, d.labels[0]: ""})
    answer_cols = [c for c in sample.columns if c != d.id]
    aligned = by_id.loc[sample[d.id].astype(str).to_numpy()]
    out = pd.DataFrame({d.id: sample[d.id].to_numpy()})
    if set(map(str, answer_cols)) == set(comp.classes):
        for col in answer_cols:
            out[col] = aligned[str(col)].to_numpy()
        return out
    values, names = aligned.to_numpy(), np.array(comp.classes)
    if len(answer_cols) == 1 and d.task == metrics.SINGLE:
        binary_scores = len(names) == 2 and metrics.REGISTRY[d.metric].on == "probabilities"
        out[answer_cols[0]] = values[:, 1] if binary_scores else names[values.argmax(1)]
        return out
    if len(answer_cols) == 1 and d.task == metrics.MULTI:
        out[answer_cols[0]] = [d.label_separator.join(names[row >= 0.5]) for row in values]
        return out
    if len(answer_cols) == 1 and len(names) == 1:
        out[answer_cols[0]] = values[:, 0]
        return out
    raise CompError(f"sample submission columns {answer_cols} are neither one answer column nor one column per "
                    f"{'target' if d.task == metrics.REGRESSION else 'class'} {comp.classes}; fix data.sample_submission")


def takes_probabilities(cfg: Config, comp: Competition) -> bool:
    """Whether the submission holds a column per class / label / target (the sample has more than one answer
    column)."""
    return comp.sample is not None and len([c for c in comp.sample.columns if c != cfg.data.id]) > 1


def leaderboard(cfg: Config, comp: Competition, predictions: np.ndarray) -> dict[str, float]:
    """Scores against the hidden answers (data.solution, with the training table's label column(s)), when
    configured."""
    d = cfg.data
    path = cfg.path(d.solution)
    sol = read_table(path, "solution", d.id, d.labels)
    for col in (d.id, *d.labels):
        if col not in sol.columns:
            raise CompError(f"solution file {path} lacks column {col!r}; it needs {d.id!r} and {list(d.labels)}")
    if set(sol[d.id]) != set(comp.test_ids):
        raise CompError(f"solution file {path} does not hold the test ids; use the solution of this test file")
    _, y = targets(cfg, sol, path, comp.classes)
    pos = pd.Series(np.arange(len(comp.test_ids)), index=comp.test_ids)[sol[d.id].to_numpy()].to_numpy()
    return metrics.score_predictions(y, predictions[pos], d.task)
