"""Read and validate the competition's tables: the training and test tables, the sample submission, any table to
predict; the classes and the texts comp derives from them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from comp.config import Config
from comp.errors import CompError

MISSING = "<missing>"


@dataclass
class Competition:
    """The validated tables and what comp derives from them."""

    train: pd.DataFrame
    test: pd.DataFrame
    sample: pd.DataFrame | None
    classes: list[str]
    y: np.ndarray
    train_text: list[str]
    test_text: list[str]
    id_col: str

    @property
    def train_ids(self) -> np.ndarray:
        return self.train[self.id_col].to_numpy(dtype=str)

    @property
    def test_ids(self) -> np.ndarray:
        return self.test[self.id_col].to_numpy(dtype=str)


def read_table(path: Path, role: str, id_col: str | None = None, str_cols: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a csv / tsv / jsonl / parquet table; every failure is one CompError naming the file."""
    if not path.is_file():
        raise CompError(f"{role} file {path} not found: fix data.{role} in the config or create the file")
    if path.stat().st_size == 0:
        raise CompError(f"{role} file {path} is empty: it needs a header and at least one row")
    as_str = {c: str for c in (id_col, *str_cols) if c}
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if ".parquet" in suffixes:
            df = pd.read_parquet(path)
        elif ".jsonl" in suffixes or ".json" in suffixes:
            lines = ".jsonl" in suffixes or _first_char(path) == "{"  # a .json file may hold JSON lines too
            df = pd.read_json(path, lines=lines, dtype=as_str or None, encoding="utf-8")
        else:
            sep = "\t" if ".tsv" in suffixes else ","
            df = pd.read_csv(path, sep=sep, dtype=as_str, encoding="utf-8", keep_default_na=True)
    except UnicodeDecodeError as exc:
        raise CompError(f"{role} file {path} is not UTF-8 (byte {exc.start}): re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError, OSError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CompError(f"{role} file {path} could not be read: {first}") from None
    if len(df) == 0:
        raise CompError(f"{role} file {path} has no rows")
    for col in as_str:
        if col in df.columns:
            df[col] = df[col].map(lambda v: v if isinstance(v, str) or _isna(v) else _spell(v))
    return df


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read(4096).lstrip()[:1]


def load_competition(cfg: Config, with_test: bool = True) -> Competition:
    """Read train (and test / sample submission), validate them against the config, derive labels and text."""
    d = cfg.data
    train = read_table(cfg.path(d.train), "train", d.id, (d.label,))
    _require_columns(train, cfg.path(d.train), [d.id, *d.text, *d.categorical, *d.numeric, d.label])
    _check_ids(train, d.id, cfg.path(d.train))
    missing_label = train[d.label].isna()
    if missing_label.any():
        raise CompError(f"train file {cfg.path(d.train)}: column {d.label!r} has {int(missing_label.sum())} "
                        f"missing label(s) (ids {_few(train.loc[missing_label, d.id])}); drop or fill those rows")
    _check_numeric(train, d.numeric, cfg.path(d.train))
    if d.train_rows and d.train_rows < len(train):
        train = _subsample(train, d.label, d.train_rows, cfg.folds.seed)
    train = train.reset_index(drop=True)
    train_text = _join_text(train, cfg, cfg.path(d.train))

    test, sample, test_text = train.iloc[:0].drop(columns=[d.label]), None, []
    if with_test:
        test = read_table(cfg.path(d.test), "test", d.id)
        _require_columns(test, cfg.path(d.test), [d.id, *d.text, *d.categorical, *d.numeric])
        if d.label in test.columns:
            raise CompError(f"test file {cfg.path(d.test)} has the label column {d.label!r}: "
                            "the test table must not carry answers; remove the column or fix data.test")
        _check_ids(test, d.id, cfg.path(d.test))
        shared = np.intersect1d(train[d.id].to_numpy(str), test[d.id].to_numpy(str))
        if len(shared):
            raise CompError(f"{len(shared)} id(s) appear in both train and test (e.g. {_few(shared)}); "
                            f"ids in column {d.id!r} must be unique across the two tables")
        _check_numeric(test, d.numeric, cfg.path(d.test))
        test = test.reset_index(drop=True)
        test_text = _join_text(test, cfg, cfg.path(d.test))
        if d.sample_submission:
            sample = _load_sample(cfg, test)

    classes = _sorted_classes(train[d.label].unique())
    index = {c: i for i, c in enumerate(classes)}
    y = train[d.label].map(index).to_numpy(dtype=np.int64)
    return Competition(train, test, sample, classes, y, train_text, test_text, d.id)


def load_table(cfg: Config, path: Path, role: str = "test") -> tuple[pd.DataFrame, list[str]]:
    """A table to predict: checked like the test table (columns, unique ids, numerics, text); extra columns are
    ignored. Returns it with its joined texts."""
    d = cfg.data
    table = read_table(path, role, d.id)
    _require_columns(table, path, [d.id, *d.text, *d.categorical, *d.numeric])
    _check_ids(table, d.id, path)
    _check_numeric(table, d.numeric, path)
    table = table.reset_index(drop=True)
    return table, _join_text(table, cfg, path)


def _load_sample(cfg: Config, test: pd.DataFrame) -> pd.DataFrame:
    d = cfg.data
    path = cfg.path(d.sample_submission)
    sample = read_table(path, "sample_submission", d.id)
    _require_columns(sample, path, [d.id])
    if len(sample.columns) < 2:
        raise CompError(f"sample_submission file {path} has only the id column; it needs the answer column(s)")
    _check_ids(sample, d.id, path)
    test_ids, sample_ids = set(test[d.id]), set(sample[d.id])
    if test_ids != sample_ids:
        extra, lacking = sorted(sample_ids - test_ids), sorted(test_ids - sample_ids)
        raise CompError(f"sample_submission file {path} does not list the test ids: {len(extra)} not in test "
                        f"(e.g. {_few(extra)}), {len(lacking)} test ids missing (e.g. {_few(lacking)}); "
                        "use the sample submission that belongs to this test file")
    return sample


def _require_columns(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CompError(f"{path}: column {missing[0]!r} named in the config is missing "
                        f"(columns are: {', '.join(map(str, df.columns))}); fix the [data] section")


def _check_ids(df: pd.DataFrame, id_col: str, path: Path) -> None:
    ids = df[id_col]
    if ids.isna().any():
        raise CompError(f"{path}: column {id_col!r} has {int(ids.isna().sum())} empty id(s); every row needs an id")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise CompError(f"{path}: column {id_col!r} has {len(dup)} duplicate id(s) (e.g. {_few(dup.unique())}); "
                        "ids must be unique")


def _check_numeric(df: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna()
        if bad.any():
            raise CompError(f"{path}: numeric column {col!r} holds non-numbers in {int(bad.sum())} row(s) "
                            f"(e.g. {_few(df[col][bad].astype(str).unique())}); fix them or list the column "
                            "under data.categorical")
        inf = np.isinf(values.to_numpy(dtype=float, na_value=np.nan))
        if inf.any():
            raise CompError(f"{path}: numeric column {col!r} holds infinite values in {int(inf.sum())} row(s); "
                            "replace them with a finite number or leave them empty")
        df[col] = values.astype(float)


def _join_text(df: pd.DataFrame, cfg: Config, path: Path) -> list[str]:
    d = cfg.data
    parts = [df[c].map(lambda v: "" if _isna(v) else str(v).strip()) for c in d.text]
    texts = [d.text_separator.join(p for p in row if p) for row in zip(*parts, strict=True)]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty and not d.allow_empty_text:
        raise CompError(f"{path}: {len(empty)} row(s) have no text in {list(d.text)} "
                        f"(ids {_few(df[d.id].iloc[empty])}); drop them or set data.allow_empty_text = true")
    return texts


def _subsample(df: pd.DataFrame, label: str, n: int, seed: int) -> pd.DataFrame:
    counts = df[label].value_counts()
    stratify = df[label] if counts.min() >= 2 and n >= len(counts) else None
    keep, _ = train_test_split(df.index.to_numpy(), train_size=n, random_state=seed, stratify=stratify)
    return df.loc[np.sort(keep)]


def _sorted_classes(values) -> list[str]:
    values = [str(v) for v in values]
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _spell(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _few(values, k: int = 3) -> str:
    values = [str(v) for v in list(values)[:k + 1]]
    return ", ".join(values[:k]) + (", ..." if len(values) > k else "")
