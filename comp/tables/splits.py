"""Split the training rows once into seeded stratified folds (by task); later stages check the split's
fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from comp import metrics
from comp.artifacts import atomic_path, read_json, sha256, write_json
from comp.config import Config
from comp.errors import CompError
from comp.tables.read import Competition, strata

ADVERSARIAL_BINS = 3  # folds.adversarial stratifies on this many quantile bins of p_test


def fingerprint(ids: np.ndarray, labels: np.ndarray, n_splits: int, seed: int, groups: np.ndarray | None = None,
                assignment: np.ndarray | None = None) -> str:
    """A hash of the rows, their labels (and groups) and the split settings; order of rows does not matter. comp's
    own split follows from these; an imported one also hashes its `assignment` (each row's fold)."""
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256(f"{n_splits}|{seed}|{'imported|' if assignment is not None else ''}".encode())
    extra = [x for x in (groups, assignment) if x is not None]
    for i in order:
        h.update(("\t".join([str(ids[i]), str(labels[i]), *(str(x[i]) for x in extra)]) + "\n").encode())
    return h.hexdigest()[:16]


def groups_of(cfg: Config, comp: Competition) -> np.ndarray | None:
    """folds.group's value for every training row (None when the split is not grouped)."""
    col = cfg.folds.group
    if not col:
        return None
    if col not in comp.train.columns:
        raise CompError(f"folds.group = {col!r} is not a column of {cfg.path(cfg.data.train)} (columns are: "
                        f"{', '.join(map(str, comp.train.columns))}); fix folds.group")
    values = comp.train[col]
    if values.isna().any():
        first = comp.train[cfg.data.id][values.isna()].iloc[0]
        raise CompError(f"folds.group column {col!r} has {int(values.isna().sum())} missing value(s) (first: id "
                        f"{first}): every row needs a group; fill them in or drop folds.group")
    return values.astype(str).to_numpy()


def adversarial_bins(cfg: Config, comp: Competition) -> np.ndarray | None:
    """folds.adversarial: each training row's tercile of comp.adversarial's p_test ("looks like test"); None when
    the split does not use it."""
    if not cfg.folds.adversarial:
        return None
    path = cfg.folds_path.parent / "adversarial.csv"
    if not path.is_file():
        raise CompError(f"folds.adversarial = true needs {path}: run python -m comp.adversarial first")
    table = pd.read_csv(path, dtype={cfg.data.id: str})
    p_test = dict(zip(table[cfg.data.id], table["p_test"], strict=True))
    missing = [i for i in comp.train_ids if i not in p_test]
    if missing:
        raise CompError(f"{path} has no p_test for {len(missing)} training row(s) (e.g. id {missing[0]}): rerun "
                        "python -m comp.adversarial")
    ranks = pd.Series([p_test[i] for i in comp.train_ids]).rank(method="first")
    return pd.qcut(ranks, q=min(ADVERSARIAL_BINS, len(ranks)), labels=False).to_numpy()


def split_rows(cfg: Config, comp: Competition, rows: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
    """comp's own split for data.task: stratified on the class (single_label) or on quantile bins of the target
    (regression); multi_label by iterative stratification (each label's share kept in every fold), or with
    folds.group, stratified on each row's rarest label. folds.adversarial: jointly with p_test's terciles.
    `rows`: split only these training rows, again into folds.n_splits parts (tuning's inner split), with `seed`."""
    everything = rows is None
    rows = np.arange(len(comp.y)) if everything else rows
    task, n, seed = cfg.data.task, cfg.folds.n_splits, cfg.folds.seed if seed is None else seed
    groups, bins = groups_of(cfg, comp), adversarial_bins(cfg, comp)
    groups, bins, y = (None if x is None else x[rows] for x in (groups, bins, comp.y))
    if task != metrics.MULTI:
        labels = row_labels(cfg, comp)[rows] if task == metrics.SINGLE else strata(task, y)
        return make_folds(labels, n, seed, groups, check=everything, also=bins)
    if groups is not None:
        rarest = np.where(y.any(1), np.argmin(np.where(y > 0, y.sum(0), np.inf), axis=1), -1)
        return make_folds(rarest, n, seed, groups, check=False, also=bins)
    return iterative_folds(y if bins is None else np.hstack([y, np.eye(ADVERSARIAL_BINS)[bins]]), n, seed)


def iterative_folds(y: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Iterative stratification of a 0/1 label matrix (Sechidis, Tsoumakas & Vlahavas, 2011): the rarest label
    still unplaced is dealt out first, each of its rows to the fold that most lacks that label (then the fold
    that most lacks rows, then at random); rows without labels go to the folds that most lack rows. (Written
    here: the PyPI package of this algorithm installs a top-level `tests` package that shadows a project's own.)"""
    rng = np.random.default_rng(seed)
    y = np.asarray(y) > 0
    fold = np.full(len(y), -1, dtype=np.int64)
    want_rows = np.full(n_splits, len(y) / n_splits)
    want = np.tile(y.sum(0) / n_splits, (n_splits, 1))  # (fold, label): rows of that label a fold still lacks
    left = y.copy()
    while left.any():
        counts = left.sum(0).astype(float)
        counts[counts == 0] = np.inf
        label = rng.choice(np.flatnonzero(counts == counts.min()))
        for row in rng.permutation(np.flatnonzero(left[:, label])):
            best = np.flatnonzero(want[:, label] == want[:, label].max())
            best = best[want_rows[best] == want_rows[best].max()]
            k = rng.choice(best)
            fold[row], left[row] = k, False
            want[k] -= y[row]
            want_rows[k] -= 1
    for row in rng.permutation(np.flatnonzero(fold < 0)):
        k = rng.choice(np.flatnonzero(want_rows == want_rows.max()))
        fold[row] = k
        want_rows[k] -= 1
    return fold


def row_labels(cfg: Config, comp: Competition) -> np.ndarray:
    """Each training row's target as text (what the split's fingerprint hashes): its class, or its values."""
    if cfg.data.task == metrics.SINGLE:
        return np.array(comp.classes)[comp.y]
    return np.array(["|".join(f"{v:.6g}" for v in row) for row in comp.y])


def make_folds(labels: np.ndarray, n_splits: int, seed: int, groups: np.ndarray | None = None,
               check: bool = True, also: np.ndarray | None = None) -> np.ndarray:
    """The fold number of each row: shuffled, seeded StratifiedKFold, or with groups StratifiedGroupKFold (every
    row of a group in one fold, the label shares kept as close as the groups allow). `check`: refuse a class
    with fewer rows than folds. `also`: a second variable stratified on jointly with the labels."""
    classes, counts = np.unique(labels, return_counts=True)
    small = [(c, n) for c, n in zip(classes, counts, strict=True) if n < n_splits]
    if small and check:
        c, n = small[0]
        raise CompError(f"class {c} has {n} row(s), fewer than folds.n_splits = {n_splits}; "
                        "lower folds.n_splits or merge / drop that class")
    fold = np.full(len(labels), -1, dtype=np.int64)
    if also is not None:
        labels = np.char.add(np.asarray(labels).astype(str), np.char.add("|", np.asarray(also).astype(str)))
    if groups is None:
        parts = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    else:
        n_groups = len(set(groups))
        if n_groups < n_splits:
            raise CompError(f"folds.group has {n_groups} distinct value(s), fewer than folds.n_splits = {n_splits}; "
                            "lower folds.n_splits or group more finely")
        parts = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups)
    for k, (_, val) in enumerate(parts):
        fold[val] = k
    return fold


def meta_path(cfg: Config) -> Path:
    return cfg.folds_path.with_suffix(".json")


def split_fingerprint(cfg: Config, comp: Competition, fold: np.ndarray, imported: bool) -> str:
    labels, bins = row_labels(cfg, comp), None if imported else adversarial_bins(cfg, comp)
    if bins is not None:
        labels = np.char.add(labels.astype(str), np.char.add("|p_test tercile ", bins.astype(str)))
    return fingerprint(comp.train_ids, labels, cfg.folds.n_splits, cfg.folds.seed, groups_of(cfg, comp),
                       fold if imported else None)


def write_folds(cfg: Config, comp: Competition, fold: np.ndarray, fp: str, imported: str = "") -> None:
    """Write folds.csv (id, fold) and its fingerprint file (fp: split_fingerprint of this split; `imported`:
    the file the split came from)."""
    with atomic_path(cfg.folds_path) as tmp:
        pd.DataFrame({"id": comp.train_ids, "fold": fold}).to_csv(tmp, index=False)
    write_json(meta_path(cfg), {"fingerprint": fp, "n_splits": cfg.folds.n_splits, "seed": cfg.folds.seed,
                                "group": cfg.folds.group, "adversarial": cfg.folds.adversarial, "imported": imported,
                                "n_rows": len(fold),
                                "csv_sha256": sha256(cfg.folds_path)})


def import_folds(cfg: Config, comp: Competition, path: Path) -> np.ndarray:
    """A user's own split (a table with id and fold columns) aligned with the training rows, after checking it
    names every training row once, no other id, and folds 0 .. n_splits-1 each with rows."""
    from comp.tables.read import read_table

    if not path.is_file():
        raise CompError(f"--from {path}: no such file")
    table = read_table(path, "folds", cfg.data.id)
    id_col = cfg.data.id if cfg.data.id in table.columns else "id"
    if id_col not in table.columns or "fold" not in table.columns:
        raise CompError(f"{path} needs the columns {cfg.data.id} (or id) and fold (it has "
                        f"{', '.join(map(str, table.columns))})")
    if table[id_col].duplicated().any():
        raise CompError(f"{path} names id {table[id_col][table[id_col].duplicated()].iloc[0]} more than once: "
                        "give each training row one fold")
    fold = pd.to_numeric(table["fold"], errors="coerce")
    if fold.isna().any() or (fold % 1 != 0).any():
        raise CompError(f"{path}: column fold holds a value that is not a whole number; give each row's fold 0 .. "
                        f"{cfg.folds.n_splits - 1}")
    by_id = dict(zip(table[id_col].astype(str), fold.astype(int), strict=True))
    unknown = sorted(set(by_id) - set(comp.train_ids))
    missing = [i for i in comp.train_ids if i not in by_id]
    if unknown or missing:
        what = f"names {len(unknown)} id(s) not in train (e.g. {unknown[0]})" if unknown else \
            f"misses {len(missing)} training row(s) (e.g. id {missing[0]})"
        raise CompError(f"{path} {what}: it must give the fold of every training row, and of no other")
    out = np.array([by_id[i] for i in comp.train_ids], dtype=np.int64)
    if set(out) != set(range(cfg.folds.n_splits)):
        raise CompError(f"{path} has folds {sorted(set(out))}, but folds.n_splits = {cfg.folds.n_splits} needs "
                        f"0 .. {cfg.folds.n_splits - 1}, each with rows: fix the file or folds.n_splits")
    return out


def load_folds(cfg: Config, comp: Competition) -> tuple[np.ndarray, str]:
    """Fold numbers aligned with comp.train's rows, after checking the split still matches train."""
    path, meta_file = cfg.folds_path, meta_path(cfg)
    if not path.is_file() or not meta_file.is_file():
        raise CompError(f"{path} not found: make the folds first (make folds, or python -m comp.folds)")
    meta = read_json(meta_file)
    if meta.get("csv_sha256") != sha256(path):
        raise CompError(f"{path} was changed after it was written: remake it with python -m comp.folds --force")
    made = (meta.get("n_splits"), meta.get("seed"), meta.get("group", ""), meta.get("adversarial", False))
    wanted = (cfg.folds.n_splits, cfg.folds.seed, cfg.folds.group, cfg.folds.adversarial)
    if made != wanted:
        raise CompError(f"{path} was made with n_splits={made[0]}, seed={made[1]}, group={made[2]!r}, "
                        f"adversarial={made[3]} but the config says {', '.join(map(repr, wanted))}: remake it with "
                        "python -m comp.folds --force")
    table = pd.read_csv(path, dtype={"id": str})
    by_id = dict(zip(table["id"], table["fold"], strict=True))
    ids = comp.train_ids
    added = [i for i in ids if i not in by_id]
    if added or len(by_id) != len(ids):
        removed = len(by_id) - (len(ids) - len(added))
        raise CompError(f"{path} no longer matches the training rows ({len(added)} added, {removed} removed): "
                        "remake it with python -m comp.folds --force")
    fold = np.array([by_id[i] for i in ids], dtype=np.int64)
    fp = split_fingerprint(cfg, comp, fold, bool(meta.get("imported")))
    if fp != meta.get("fingerprint"):
        raise CompError(f"{path} no longer matches the training rows (labels{' or groups' if cfg.folds.group else ''}"
                        f"{' or adversarial.csv' if cfg.folds.adversarial else ''} changed): "
                        "remake it with python -m comp.folds --force")
    return fold, fp


def trained_runs(cfg: Config) -> list[Path]:
    """Fold folders beside the split that hold finished training (they depend on it)."""
    return sorted(cfg.folds_path.parent.glob("*/fold_*/metrics.json"))
