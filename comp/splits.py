"""Split the training rows once into seeded stratified folds; later stages check the split's fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from comp.artifacts import atomic_path, read_json, sha256, write_json
from comp.config import Config
from comp.errors import CompError
from comp.tables import Competition


def fingerprint(ids: np.ndarray, labels: np.ndarray, n_splits: int, seed: int) -> str:
    """A hash of the rows, their labels and the split settings; order of rows does not matter."""
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256(f"{n_splits}|{seed}|".encode())
    for i in order:
        h.update(f"{ids[i]}\t{labels[i]}\n".encode())
    return h.hexdigest()[:16]


def make_folds(labels: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The fold number of each row (shuffled, seeded StratifiedKFold)."""
    classes, counts = np.unique(labels, return_counts=True)
    small = [(c, n) for c, n in zip(classes, counts, strict=True) if n < n_splits]
    if small:
        c, n = small[0]
        raise CompError(f"class {c} has {n} row(s), fewer than folds.n_splits = {n_splits}; "
                        "lower folds.n_splits or merge / drop that class")
    fold = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold[val] = k
    return fold


def meta_path(cfg: Config) -> Path:
    return cfg.folds_path.with_suffix(".json")


def write_folds(cfg: Config, comp: Competition, fold: np.ndarray) -> str:
    """Write folds.csv (id, fold) and its fingerprint file; return the fingerprint."""
    labels = np.array(comp.classes)[comp.y]
    fp = fingerprint(comp.train_ids, labels, cfg.folds.n_splits, cfg.folds.seed)
    with atomic_path(cfg.folds_path) as tmp:
        pd.DataFrame({"id": comp.train_ids, "fold": fold}).to_csv(tmp, index=False)
    write_json(meta_path(cfg), {"fingerprint": fp, "n_splits": cfg.folds.n_splits, "seed": cfg.folds.seed,
                                "n_rows": len(fold), "csv_sha256": sha256(cfg.folds_path)})
    return fp


def load_folds(cfg: Config, comp: Competition) -> tuple[np.ndarray, str]:
    """Fold numbers aligned with comp.train's rows, after checking the split still matches train."""
    path, meta_file = cfg.folds_path, meta_path(cfg)
    if not path.is_file() or not meta_file.is_file():
        raise CompError(f"{path} not found: make the folds first (make folds, or python -m comp.folds)")
    meta = read_json(meta_file)
    if meta.get("csv_sha256") != sha256(path):
        raise CompError(f"{path} was changed after it was written: remake it with python -m comp.folds --force")
    if meta.get("n_splits") != cfg.folds.n_splits or meta.get("seed") != cfg.folds.seed:
        raise CompError(f"{path} was made with n_splits={meta.get('n_splits')}, seed={meta.get('seed')} but the "
                        f"config says {cfg.folds.n_splits}, {cfg.folds.seed}: remake it with python -m comp.folds --force")
    table = pd.read_csv(path, dtype={"id": str})
    by_id = dict(zip(table["id"], table["fold"], strict=True))
    ids = comp.train_ids
    added = [i for i in ids if i not in by_id]
    if added or len(by_id) != len(ids):
        removed = len(by_id) - (len(ids) - len(added))
        raise CompError(f"{path} no longer matches the training rows ({len(added)} added, {removed} removed): "
                        "remake it with python -m comp.folds --force")
    fp = fingerprint(ids, np.array(comp.classes)[comp.y], cfg.folds.n_splits, cfg.folds.seed)
    if fp != meta.get("fingerprint"):
        raise CompError(f"{path} no longer matches the training rows (labels changed): "
                        "remake it with python -m comp.folds --force")
    return np.array([by_id[i] for i in ids], dtype=np.int64), fp


def trained_runs(cfg: Config) -> list[Path]:
    """Fold folders beside the split that hold finished training (they depend on it)."""
    return sorted(cfg.folds_path.parent.glob("*/fold_*/metrics.json"))
