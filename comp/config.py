"""Typed, frozen configuration: one TOML file plus `--set section.key=value` overrides, validated once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from comp.errors import CompError

MONITORS = {"val_loss": "min", "val_macro_f1": "max", "val_accuracy": "max"}


@dataclass(frozen=True)
class DataConfig:
    """Where the competition's tables are and what their columns mean."""

    train: str = "data/train.csv"
    test: str = "data/test.csv"
    sample_submission: str | None = None
    solution: str | None = None
    id: str = "id"
    text: tuple[str, ...] = ("text",)
    text_separator: str = " . "
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    label: str = "label"
    train_rows: int = 0
    allow_empty_text: bool = False

    def __post_init__(self):
        _require(len(self.text) > 0, "data.text must name at least one text column")
        _require(self.train_rows >= 0, "data.train_rows must be >= 0 (0 = every row)")
        cols = [self.id, self.label, *self.text, *self.categorical, *self.numeric]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        _require(not dup, f"data: column(s) {dup} are named in more than one role")


@dataclass(frozen=True)
class FoldsConfig:
    """How the training rows are split into stratified folds."""

    n_splits: int = 5
    seed: int = 42
    path: str = "folds/folds.csv"

    def __post_init__(self):
        _require(self.n_splits >= 2, "folds.n_splits must be >= 2")


@dataclass(frozen=True)
class RunConfig:
    """The name under which fold artifacts and the submission are written."""

    name: str = "default"
    submissions_dir: str = "submissions"

    def __post_init__(self):
        ok = self.name and all(ch.isalnum() or ch in "-_." for ch in self.name) and self.name[0] != "."
        _require(bool(ok), f"run.name {self.name!r} must be letters, digits, '-', '_' or '.'")


@dataclass(frozen=True)
class ModelConfig:
    """The encoder, its pooling and the MLP head."""

    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: str = "cls"
    head_hidden: tuple[int, ...] = (512, 64)
    dropout: float = 0.2
    max_length: int = 256

    def __post_init__(self):
        _require(self.pooling in ("cls", "mean"), "model.pooling must be 'cls' or 'mean'")
        _require(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _require(self.max_length >= 8, "model.max_length must be >= 8")
        _require(all(h > 0 for h in self.head_hidden), "model.head_hidden sizes must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of one fold."""

    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    patience: int = 2
    monitor: str = "val_loss"
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 20
    checkpoint_every: int = 500

    def __post_init__(self):
        _require(self.epochs >= 1, "train.epochs must be >= 1")
        _require(self.batch_size >= 1 and self.eval_batch_size >= 1, "train batch sizes must be >= 1")
        _require(self.encoder_lr > 0 and self.head_lr > 0, "train learning rates must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = no clipping)")
        _require(self.patience >= 1, "train.patience must be >= 1")
        _require(self.monitor in MONITORS, f"train.monitor must be one of {sorted(MONITORS)}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(self.precision in ("auto", "fp32", "bf16"), "train.precision must be 'auto', 'fp32' or 'bf16'")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0 = only at epoch ends)")


SECTIONS = {"data": DataConfig, "folds": FoldsConfig, "run": RunConfig, "model": ModelConfig, "train": TrainConfig}
# Keys that do not change what a fold learns; they stay out of the config hash.
UNHASHED = {"data": {"sample_submission", "solution"}, "run": {"submissions_dir"},
            "train": {"device", "eval_batch_size", "log_every", "checkpoint_every"}}


@dataclass(frozen=True)
class Config:
    """The whole configuration; relative paths are relative to `root` (the config file's folder)."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    root: Path = Path(".")

    def path(self, relative: str) -> Path:
        """Resolve a path from the config against the config file's folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def folds_path(self) -> Path:
        return self.path(self.folds.path)

    @property
    def run_dir(self) -> Path:
        return self.folds_path.parent / self.run.name

    def fold_dir(self, fold: int) -> Path:
        return self.run_dir / f"fold_{fold}"

    @property
    def submission_path(self) -> Path:
        return self.path(self.run.submissions_dir) / f"{self.run.name}.csv"

    def to_dict(self) -> dict:
        """The sections as plain TOML-able data."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    def hash(self) -> str:
        """A short hash of every setting that changes what a fold learns."""
        d = self.to_dict()
        for section, keys in UNHASHED.items():
            for k in keys:
                d[section].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, section: str, **changes) -> Config:
        """A copy with some keys of one section changed (validated again)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def load(path: str | Path = "comp.toml", overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config, apply `section.key=value` overrides, validate everything once."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompError(f"config file {path} not found: pass --config PATH or create it (see README)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CompError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides:
        section, key, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise CompError(f"config section [{section}] in {path} must be a table")
        raw[section][key] = value
    return from_dict(raw, root=path.resolve().parent, source=str(path))


def from_dict(raw: dict, root: Path = Path("."), source: str = "config") -> Config:
    """Build and validate a Config from plain data."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise CompError(f"unknown config section [{unknown[0]}] in {source}; known sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise CompError(f"config section [{name}] in {source} must be a table")
        sections[name] = _build(cls, name, values, source)
    return Config(**sections, root=root)


def _build(cls, section: str, values: dict, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise CompError(f"unknown config key {section}.{key} in {source}; known keys: {', '.join(names)}")
        kwargs[key] = _check_type(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except _Invalid as exc:
        raise CompError(f"{exc} (in {source})") from None


def _check_type(key: str, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is tuple:
        if isinstance(value, str) and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, f"a list of {args[0].__name__}")
        return tuple(_check_type(key, v, args[0]) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise _type_error(key, value, hint.__name__)
    return value


def _type_error(key, value, expected) -> CompError:
    return CompError(f"config key {key} must be {expected}, got {type(value).__name__} {value!r}")


def _parse_override(item: str) -> tuple[str, str, object]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise CompError(f"--set {item!r} must look like section.key=value, e.g. --set train.epochs=3")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as mean or cuda is a string
    return section, key, value


class _Invalid(ValueError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def to_toml(cfg: Config) -> str:
    """Render the resolved config as TOML (for the run's record)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
