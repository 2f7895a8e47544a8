"""What each step of a run costs on this machine, in one place: comp.auto plans by it, comp.predict --estimate
and the benchmarks measure with it. A classical fold's seconds come from make bench-scale's curves; an encoder's
rows/s are measured here, on a sample of the competition's own rows."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from comp.config import Config
from comp.nn.batching import epoch_batches
from comp.nn.distributed import SINGLE
from comp.nn.engine import Fold, runtime, set_up
from comp.nn.loop import make_progress, predict, train_one_epoch
from comp.nn.model import build_model
from comp.outputs.runs import Tokens, prepare_fold
from comp.tables.read import Competition

# Seconds one fold of a classical run took by its training rows on the 2-core CPU of docs/benchmarks.md
# (make bench-scale and the 2,000-row demos, 2026-12-07): interpolated log-log, linear in rows beyond the ends.
# The linear run reads char n-grams up to 200k rows (text.WORD_ONLY_ROWS), so 160k rows cost more than 800k.
FOLD_SECONDS = {"linear": {1_600: 40.0, 16_000: 111.0, 160_000: 375.0, 800_000: 207.0},
                "gbm": {1_600: 10.0, 16_000: 46.0, 160_000: 210.0, 800_000: 262.0}}


def classical_fold_seconds(kind: str, rows: int) -> float:
    """The seconds a fold of a `kind` run ("linear", "gbm") is expected to take on `rows` training rows."""
    sizes = sorted(FOLD_SECONDS[kind])
    seconds = [FOLD_SECONDS[kind][n] for n in sizes]
    if rows >= sizes[-1]:
        return seconds[-1] * rows / sizes[-1]
    return float(np.exp(np.interp(np.log(max(rows, 1)), np.log(sizes), np.log(seconds))))


def rows_per_second(work, rows: int, *args) -> float:
    """Rows/s of `work(*args)` (which handles `rows` rows), timed once."""
    started = time.perf_counter()
    work(*args)
    return rows / max(time.perf_counter() - started, 1e-9)


@dataclass(frozen=True)
class EncoderSpeed:
    """An encoder's measured training and prediction rows/s at the config's max_length, and the sample's token
    lengths (truncated at that max_length): what the speed at a shorter max_length is scaled by."""

    train: float
    predict: float
    lengths: np.ndarray

    def scaled(self, max_length: int) -> float:
        """The factor on the rows/s at a shorter max_length: fewer tokens a row, proportionally faster."""
        return float(self.lengths.sum() / np.minimum(self.lengths, max_length).sum())

    def fold_seconds(self, max_length: int, epochs: int, n_train: int, n_val: int, n_test: int) -> float:
        """One fold: `epochs` epochs of training and of validation, then the test rows once."""
        f = self.scaled(max_length)
        return epochs * (n_train / (self.train * f) + n_val / (self.predict * f)) + n_test / (self.predict * f)


def encoder_speed(cfg: Config, comp: Competition, tokens: Tokens, rows: int = 64) -> EncoderSpeed:
    """Train and predict the config's model, built as a fold builds it, on `rows` random training rows: after a
    warm-up epoch, the faster of two epochs and of two prediction passes (a moment of other work on the machine
    slows one)."""
    idx = np.random.default_rng(cfg.train.seed).permutation(len(comp.y))[:rows]
    _, train_rows, _, _ = prepare_fold(cfg, comp, idx, idx[:1], Tokens(tokens.train, None, tokens.pad_id))
    model = build_model(cfg.model, train_rows.meta.shape[1], len(comp.classes), root=cfg.root, task=cfg.data.task,
                        tcfg=cfg.train)
    fold = Fold(0, train_rows, None, None, tokens.pad_id)
    rt = runtime(cfg.train, model, fold, SINGLE)
    state, rng = set_up(cfg.train, model, fold, rt)
    with make_progress(Console(quiet=True)) as progress:
        def epoch():
            train_one_epoch(state, train_rows, epoch_batches(train_rows, cfg.train, rng), rt, progress)
        epoch()
        train_speed = max(rows_per_second(epoch, len(idx)) for _ in range(2))
    predict_speed = max(rows_per_second(predict, len(idx), model, train_rows, cfg.train.eval_batch_size,
                                        tokens.pad_id, rt.device, rt.amp) for _ in range(2))
    return EncoderSpeed(train_speed, predict_speed, np.asarray(train_rows.lengths))
