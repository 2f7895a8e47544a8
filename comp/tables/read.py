"""Read and validate the competition's tables: the training and test tables, the sample submission, any table to
predict; the classes and the texts comp derives from them."""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from comp import metrics
from comp.config import Config, DataConfig
from comp.errors import CompError

MISSING = "<missing>"
PAIR = "\x1f"  # joins the two sides of a text pair in a row's text (stripped from the columns' own values)
SEGMENT = "\x1e"  # data.template: before SEGMENT text SEGMENT after; batching.tokenize cuts only the text


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
    digests: dict = field(default_factory=dict, repr=False)  # identity.tables' fingerprints, by columns

    @property
    def train_ids(self) -> np.ndarray:
        return self.train[self.id_col].to_numpy(dtype=str)

    @property
    def test_ids(self) -> np.ndarray:
        return self.test[self.id_col].to_numpy(dtype=str)


def read_table(path: Path, role: str, id_col: str | None = None, str_cols: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a csv / tsv / jsonl / parquet table; every failure is one CompError naming the file."""
    if not path.is_file():
        key = role if "." in role else f"data.{role}"
        raise CompError(f"{role} file {path} not found: fix {key} in the config or create the file")
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
            df[col] = df[col].map(lambda v: v if isinstance(v, str) or _isna(v) else spell(v))
    return df


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read(4096).lstrip()[:1]


def load_competition(cfg: Config, with_test: bool = True) -> Competition:
    """Read train (and test / sample submission), validate them against the config, derive targets and text."""
    d = cfg.data
    train = read_table(cfg.path(d.train), "train", d.id, d.labels)
    _require_columns(train, cfg.path(d.train), [d.id, *d.text_columns, *d.categorical, *d.numeric, *d.labels])
    _check_ids(train, d.id, cfg.path(d.train))
    _check_numeric(train, d.numeric, cfg.path(d.train))
    classes, y = targets(cfg, train, cfg.path(d.train))
    if d.train_rows and d.train_rows < len(train):
        keep = _subsample(len(train), strata(d.task, y), d.train_rows, cfg.folds.seed)
        train, y = train.iloc[keep], y[keep]
    train = train.reset_index(drop=True)
    train_text = _join_text(train, cfg, cfg.path(d.train))

    test, sample, test_text = train.iloc[:0].drop(columns=list(d.labels)), None, []
    if with_test:
        test = read_table(cfg.path(d.test), "test", d.id)
        _require_columns(test, cfg.path(d.test), [d.id, *d.text_columns, *d.categorical, *d.numeric])
        carried = [c for c in d.labels if c in test.columns]
        if carried:
            raise CompError(f"test file {cfg.path(d.test)} has the label column {carried[0]!r}: "
                            "the test table must not carry answers; remove the column or fix data.test")
        _check_ids(test, d.id, cfg.path(d.test))
        shared = np.intersect1d(train[d.id].to_numpy(str), test[d.id].to_numpy(str))
        if len(shared):
            raise CompError(f"{len(shared)} id(s) appear in both train and test (e.g. {_few(shared)}); "
                            f"ids in column {d.id!r} must be unique across the two tables")
        _check_numeric(test, d.numeric, cfg.path(d.test))
        for col in d.categorical:
            mostly_unseen(col, set(train[col].map(category)), test[col], f"test file {cfg.path(d.test)}")
        test = test.reset_index(drop=True)
        test_text = _join_text(test, cfg, cfg.path(d.test))
        if d.sample_submission:
            sample = _load_sample(cfg, test)
    return Competition(train, test, sample, classes, y, train_text, test_text, d.id)


def targets(cfg: Config, frame: pd.DataFrame, path: Path, names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """The target names and values of a table's label column(s), by data.task: single_label, class indices
    (int64) into the sorted classes; multi_label, a 0/1 matrix (float32) over the labels (0/1 columns, or one
    column of tags); regression, the values (float32, one column per target). `names`: those of the training
    table, which a solution table must use."""
    d = cfg.data
    missing = {c: frame[c].isna() for c in d.labels}
    if d.task != metrics.MULTI or len(d.labels) > 1:
        col = next((c for c, m in missing.items() if m.any()), None)
        if col is not None:
            raise CompError(f"{path}: column {col!r} has {int(missing[col].sum())} missing label(s) (ids "
                            f"{_few(frame.loc[missing[col], d.id])}); drop or fill those rows")
    if d.task == metrics.REGRESSION:
        return list(d.labels), np.column_stack([_numbers(frame, c, path) for c in d.labels]).astype(np.float32)
    if d.task == metrics.MULTI and len(d.labels) > 1:
        return list(d.labels), np.column_stack([_flags(frame, c, path) for c in d.labels]).astype(np.float32)
    col = d.labels[0]
    if d.task == metrics.MULTI:
        tags = [_tags(v, d.label_separator, col, path) for v in frame[col]]
        names = names or sorted({t for row in tags for t in row})
        if not names:
            raise CompError(f"{path}: tag column {col!r} holds no tag on any row; check data.label and "
                            "data.label_separator")
        index = {t: i for i, t in enumerate(names)}
        _known(path, {t for row in tags for t in row} - set(index))
        y = np.zeros((len(frame), len(names)), np.float32)
        for i, row in enumerate(tags):
            y[i, [index[t] for t in row]] = 1.0
        return names, y
    names = names or _sorted_classes(frame[col].unique())
    index = {c: i for i, c in enumerate(names)}
    _known(path, set(frame[col]) - set(index))
    return names, frame[col].map(index).to_numpy(dtype=np.int64)


def strata(task: str, y: np.ndarray, bins: int = 10) -> np.ndarray | None:
    """What to stratify a sample of rows on: the class; the quantile bin of the (first) regression target;
    nothing for multi_label (its folds use iterative stratification)."""
    if task == metrics.SINGLE:
        return y
    if task == metrics.REGRESSION:
        return pd.qcut(pd.Series(y[:, 0]).rank(method="first"), q=min(bins, len(y)), labels=False).to_numpy()
    return None


def _known(path: Path, unknown: set) -> None:
    if unknown:
        raise CompError(f"{path} has labels never seen in train ({sorted(map(str, unknown))[:3]}); check data.label")


def _numbers(frame: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[col], errors="coerce")
    bad = values.isna() | np.isinf(values.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        raise CompError(f"{path}: regression target {col!r} holds text or infinite values in {int(bad.sum())} row(s) "
                        f"(e.g. {_few(frame[col][bad].astype(str).unique())}); fix those rows, or use data.task = "
                        "\"single_label\" for classes")
    return values.to_numpy(dtype=np.float64)


def _flags(frame: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(frame[col].replace({"True": 1, "False": 0, "true": 1, "false": 0}), errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        raise CompError(f"{path}: multi-label column {col!r} holds values other than 0 and 1 in {int(bad.sum())} "
                        f"row(s) (e.g. {_few(frame[col][bad].astype(str).unique())}); each label column is 0 or 1")
    return values.to_numpy(dtype=np.float64)


def _tags(value, separator: str, col: str, path: Path) -> list[str]:
    """One cell of a tag column: empty (no label), a list such as ["a", "b"], or tags joined by the separator."""
    if _isna(value) or not str(value).strip():
        return []
    text = str(value).strip()
    if text[0] in "[(":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if not isinstance(parsed, (list, tuple)) or not all(isinstance(t, (str, int)) for t in parsed):
            raise CompError(f"{path}: tag column {col!r} holds {text[:40]!r}, neither a list such as [\"a\", \"b\"] "
                            f"nor tags joined by data.label_separator {separator!r}; fix the column or the separator")
        return sorted({str(t).strip() for t in parsed if str(t).strip()})
    return sorted({t.strip() for t in text.split(separator) if t.strip()})


def load_table(cfg: Config, path: Path, role: str = "test") -> tuple[pd.DataFrame, list[str]]:
    """A table to predict: checked like the test table (columns, unique ids, numerics, text); extra columns are
    ignored. Returns it with its joined texts."""
    d = cfg.data
    table = read_table(path, role, d.id)
    _require_columns(table, path, [d.id, *d.text_columns, *d.categorical, *d.numeric])
    _check_ids(table, d.id, path)
    _check_numeric(table, d.numeric, path)
    table = table.reset_index(drop=True)
    return table, _join_text(table, cfg, path)


def load_texts(cfg: Config, path: Path, role: str) -> list[str]:
    """A table of unlabeled texts (data.text's columns; others ignored), joined as the training texts are."""
    table = read_table(path, role)
    _require_columns(table, path, list(cfg.data.text_columns))
    return _join_text(table.reset_index(drop=True), cfg, path)


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
    """Each row's text: data.text's columns joined by data.text_separator (empty parts skipped), or the two
    sides of data.text_pair joined by PAIR (batching.tokenize encodes them as a pair)."""
    d = cfg.data
    parts = [df[c].map(lambda v: "" if _isna(v) else str(v).replace(PAIR, " ").replace(SEGMENT, " ").strip())
             for c in d.text_columns]
    if d.text_pair:
        texts = [a + PAIR + b if a or b else "" for a, b in zip(*parts, strict=True)]
    else:
        texts = [d.text_separator.join(p for p in row if p) for row in zip(*parts, strict=True)]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty and not d.allow_empty_text:
        raise CompError(f"{path}: {len(empty)} row(s) have no text in {list(d.text_columns)} "
                        f"(ids {_few(df[d.id].iloc[empty])}); drop them or set data.allow_empty_text = true")
    return render(d, df, texts, path) if d.template and cfg.model.kind == "encoder" else texts


def render(d: DataConfig, df: pd.DataFrame, texts: list[str], path: Path) -> list[str]:
    """data.template filled in for each row: {text} the row's text, {column} the column's value (a missing one
    empty); the text is marked off by SEGMENT, so that truncation cuts it and never the columns around it.
    Encoder and LLM runs read it; linear and gbm runs take their columns as features instead."""
    columns = d.template_columns
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CompError(f"data.template names {{{missing[0]}}}, which is not a column of {path}: name one of its "
                        f"columns ({_few(df.columns, 6)})")
    values = {c: df[c].map(lambda v: "" if _isna(v) else spell(v).replace(SEGMENT, " ")).tolist() for c in columns}
    return [d.template.format_map({**{c: values[c][i] for c in columns}, "text": SEGMENT + t + SEGMENT})
            for i, t in enumerate(texts)]


def _subsample(n_rows: int, groups: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Row positions of a sample of n of n_rows rows, stratified on `groups` where every group has two rows or more."""
    stratify = None
    if groups is not None:
        counts = np.unique(groups, return_counts=True)[1]
        stratify = groups if counts.min() >= 2 and n >= len(counts) else None
    keep, _ = train_test_split(np.arange(n_rows), train_size=n, random_state=seed, stratify=stratify)
    return np.sort(keep)


def _sorted_classes(values) -> list[str]:
    values = [str(v) for v in values]
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def spell(v) -> str:
    """A cell as comp reads an id or a category: text as it is, an integral number without its decimal point
    (1, 1.0 and numpy's 1 all read "1", so a column pandas read as float in one table, for a missing value,
    matches the other table's ints), other values as Python writes them."""
    if isinstance(v, str):
        return v
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def category(v) -> str:
    """A categorical cell's value: spell(v), or MISSING (a value of its own)."""
    return MISSING if pd.isna(v) else spell(v)


MOSTLY_UNSEEN = 0.5  # a categorical column whose test values are mostly unseen in training is refused


def mostly_unseen(column: str, known: set[str], values: pd.Series, where: str) -> None:
    """Refuse a categorical column most of whose (non-missing) values in `where` were never seen in training:
    each such row encodes as unseen, which no CV shows."""
    present = values[values.notna()].map(spell)
    unseen = present[~present.isin(known)]
    if len(unseen) >= 5 and len(unseen) > MOSTLY_UNSEEN * len(present):
        raise CompError(f"categorical column {column!r}: {len(unseen)} of {len(present)} values in {where} were never "
                        f"seen in training (e.g. {_few(unseen.unique())}; training has e.g. "
                        f"{_few(sorted(known - {MISSING}))}): spell them alike in both tables, or drop the column "
                        "from data.categorical")


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _few(values, k: int = 3) -> str:
    values = [str(v) for v in list(values)[:k + 1]]
    return ", ".join(values[:k]) + (", ..." if len(values) > k else "")
