"""What each step of a run costs on this machine, in one place: comp.auto plans by it, comp.predict --estimate
and the benchmarks measure with it. A classical fold's seconds come from make bench-scale's curves; an encoder's
rows/s are measured here, on a sample of the competition's own rows."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from comp.config import Config
from comp.nn.batching import epoch_batches, inference_batches, train_batches
from comp.nn.distributed import SINGLE
from comp.nn.engine import TEXT_NORM_ROWS, Fold, runtime, set_up
from comp.nn.hardware import eval_rows
from comp.nn.loop import make_progress, predict, train_one_epoch
from comp.nn.model import build_model
from comp.nn.state import Checkpoint
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


def timed(work, *args, **kwargs) -> tuple[float, object]:
    """The seconds one call of `work(*args, **kwargs)` took, and what it returned."""
    started = time.perf_counter()
    out = work(*args, **kwargs)
    return max(time.perf_counter() - started, 1e-9), out


def rows_per_second(work, rows: int, *args) -> float:
    """Rows/s of `work(*args)` (which handles `rows` rows), timed once."""
    return rows / timed(work, *args)[0]


LENGTH_ROWS = 20_000  # the training rows whose token lengths estimate a fold's padded tokens a row
SHORT = 8  # tokens a row keeps in the epochs that measure what a training step costs beyond its tokens


def padded_tokens(lengths: np.ndarray, batches, multiple: int) -> int:
    """What a list of batches costs: each batch's rows × its longest row, rounded up to `multiple` tokens."""
    return sum(len(b) * -(-int(lengths[b].max()) // multiple) * multiple for b in batches if len(b))


@dataclass(frozen=True)
class EncoderSpeed:
    """An encoder's measured training and prediction speed in padded tokens/s (a batch costs its rows × its
    longest row) plus the seconds a training step costs whatever its tokens (the optimizer's pass over every
    weight: most of a step for a large vocabulary and short texts), and the token lengths of the competition's
    training rows at the config's max_length: batched as a fold batches them (training: pools sorted by length;
    prediction: sorted), they give a fold's padded tokens at any max_length. A small sample's batches hold more
    padding than a fold's, so its rows/s alone would understate a fold's speed. A padded token's cost depends on
    the window (on 2 cores MiniLM trains 1,800 tokens/s at 64-128 and 550 at 256), so `windows` holds the
    (training tokens/s, step seconds) measured at each max_length a plan may choose; `train` and `step` serve any
    other."""

    train: float
    predict: float
    lengths: np.ndarray
    batch_size: int
    eval_batch_size: int
    multiple: int
    step: float = 0.0
    fixed: float = 0.0  # seconds a fold costs whatever its rows: building the model and writing it
    save: float = 0.0   # seconds a resume checkpoint costs (weights, best weights, optimizer state)
    windows: dict = field(default_factory=dict)  # max_length -> (training tokens/s, step seconds) measured there
    known: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # per_row's answers: a plan asks often

    def per_row(self, max_length: int, training: bool) -> float:
        """Padded tokens a row costs in a fold's training (or prediction) batches at `max_length`."""
        if (max_length, training) not in self.known:
            lengths = np.minimum(self.lengths, max_length)
            batches = (train_batches(lengths, self.batch_size, np.random.default_rng(0)) if training
                       else inference_batches(lengths, self.eval_batch_size))
            self.known[max_length, training] = padded_tokens(lengths, batches, self.multiple) / len(lengths)
        return self.known[max_length, training]

    def rows_per_second(self, max_length: int) -> tuple[float, float]:
        """A fold's training and prediction rows/s at `max_length`."""
        speed, step = self.windows.get(max_length, (self.train, self.step))
        train = 1 / (step / self.batch_size + self.per_row(max_length, True) / speed)
        return train, self.predict / self.per_row(max_length, False)

    def fold_seconds(self, max_length: int, epochs: int, n_train: int, n_val: int, n_test: int,
                     checkpoint_seconds: float = 0.0) -> float:
        """One fold: building and writing the model, the pass that fits model.text_norm, `epochs` epochs of training
        and of validation, then the test rows once; a checkpoint at each epoch's end and every `checkpoint_seconds`
        of training (0: epoch ends)."""
        train, predict = self.rows_per_second(max_length)
        training = epochs * n_train / train
        checkpoints = epochs + (int(training // checkpoint_seconds) if checkpoint_seconds > 0 else 0)
        predicted = min(n_train, TEXT_NORM_ROWS) + epochs * n_val + n_test
        return self.fixed + checkpoints * self.save + training + predicted / predict


def encoder_speed(cfg: Config, comp: Competition, tokens: Tokens, windows: tuple[int, ...] = (),
                  rows: int = 64, worth=None) -> EncoderSpeed:
    """Train and predict the config's model, built as a fold builds it, on `rows` random training rows: after a
    warm-up epoch, the faster of two epochs and of two prediction passes (a moment of other work on the machine
    slows one). Training is timed at the config's max_length and at each of `windows` (the rows cut to it; a cut
    that changes no row reuses the last measure), and at SHORT tokens, which splits a step's seconds into a part
    that grows with its padded tokens and a part that does not. `worth(speed, length)`, where given, is asked
    before each window past the shortest, with that window costed at the rate of the last one measured (on a CPU a
    longer window's tokens cost no less); False ends the measure there: no plan could afford that window or longer,
    and measuring it costs the budget most (bbc: 90 s at 256 tokens)."""
    idx = np.random.default_rng(cfg.train.seed).permutation(len(comp.y))[:rows]
    _, train_rows, _, _ = prepare_fold(cfg, comp, idx, idx[:1], Tokens(tokens.train, None, tokens.pad_id))
    built, model = timed(build_model, cfg.model, train_rows.meta.shape[1], len(comp.classes), root=cfg.root,
                         task=cfg.data.task, tcfg=cfg.train)
    fold = Fold(0, train_rows, None, None, tokens.pad_id)
    rt = runtime(cfg.train, model, fold, SINGLE)
    state, rng = set_up(cfg.train, model, fold, rt)
    multiple = cfg.train.pad_to_multiple_of
    with make_progress(Console(quiet=True)) as progress:
        def epoch(part) -> tuple[int, int]:
            shares = epoch_batches(part, cfg.train, rng)
            train_one_epoch(state, part, shares, rt, progress)
            return padded_tokens(part.lengths, [b for b, _ in shares], multiple), len(shares)

        def fastest(length: int) -> tuple[float, int, int]:
            part = dataclasses.replace(train_rows, tokens=[t[:length] for t in train_rows.tokens])
            epoch(part)  # warm-up: the first batches of a shape are slower
            return min((seconds, *work) for seconds, work in (timed(epoch, part) for _ in range(2)))
        short = fastest(SHORT)
        eval_batch = eval_rows(cfg.train.eval_batch_size, rt.device)
        inference = padded_tokens(train_rows.lengths, inference_batches(train_rows.lengths, eval_batch), multiple)
        predict_speed = max(inference / timed(predict, model, train_rows, eval_batch, tokens.pad_id, rt.device,
                                              rt.amp)[0] for _ in range(2))
        table = np.random.default_rng(cfg.train.seed).permutation(len(comp.y))[:LENGTH_ROWS]
        every = prepare_fold(cfg, comp, table, table[:1], Tokens(tokens.train, None, tokens.pad_id))[1].lengths
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # as a fold's checkpoints
        with tempfile.TemporaryDirectory() as tmp:
            save = timed(Checkpoint(Path(tmp) / "last.pt", {}).save, state)[0]

        def speed(measured: dict) -> EncoderSpeed:  # an unmeasured config window: the last one's rate
            rate, step = measured.get(cfg.model.max_length, measured[max(measured)])
            return EncoderSpeed(rate, predict_speed, np.asarray(every), cfg.train.batch_size, eval_batch, multiple,
                                step, fixed=built + save, save=save, windows=measured)
        measured: dict[int, tuple[float, float]] = {}
        longest = int(max(len(t) for t in train_rows.tokens))
        for length in sorted({*windows, cfg.model.max_length}):
            last = measured[max(measured)] if measured else None
            if last and worth and not worth(speed({**measured, length: last}), length):
                break
            same = measured and max(measured) >= longest  # past the sample's longest row every cut is the same
            measured[length] = last if same else step_split(fastest(length), short)
    return speed(measured)


def step_split(full: tuple[float, int, int], short: tuple[float, int, int]) -> tuple[float, float]:
    """(training tokens/s, seconds a step costs whatever its tokens) from epochs of (seconds, padded tokens,
    steps) at a window and at SHORT tokens."""
    per_token = (full[0] - short[0]) / max(full[1] - short[1], 1)
    if per_token <= 0:
        return full[1] / full[0], 0.0
    return 1 / per_token, max(0.0, (short[0] - short[1] * per_token) / short[2])
