"""One fold's training: set up the training state, restore a resume checkpoint, run epochs with early
stopping, then predict the test rows with the best weights. Batching lives in comp.nn.batching, the loop in
comp.nn.loop, the state that a checkpoint saves in comp.nn.state, the loss in comp.nn.objective."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn
from transformers import get_linear_schedule_with_warmup

from comp import metrics
from comp.config import Config, TrainConfig
from comp.errors import CompError
from comp.nn.batching import Rows, epoch_batches, planned_steps
from comp.nn.distributed import SINGLE, Dist
from comp.nn.hardware import resolve_device, resolve_precision
from comp.nn.loop import Runtime, check_packing, make_progress, predict, train_one_epoch
from comp.nn.model import TextMetaClassifier, init_wide
from comp.nn.objective import Distilled, make_loss, row_weights, validation_loss
from comp.nn.state import (
    EMA,
    Checkpoint,
    EarlyStopping,
    FitState,
    Snapshots,
    TrainState,
    average_weights,
    improves,
    make_optimizer,
    seed_everything,
)


@dataclass
class Fold:
    """What fit_fold trains on: the fold's number, its train / validation / test rows (None: no test rows to
    predict), the tokenizer's padding id, the resume checkpoint, and a hook that sees each epoch's metrics
    row and may raise to stop the fold (tuning prunes trials that way)."""

    index: int
    train: Rows
    val: Rows | None  # None: a full-data refit, train.epochs epochs on every row, the last one kept
    test: Rows | None
    pad_id: int
    checkpoint: Checkpoint | None = None
    on_epoch: Callable[[dict], None] | None = None


@dataclass
class FoldResult:
    """What fit_fold learned: the best weights, the validation row and logits they give, and the test logits.
    `swa`: what train.swa averaged, and whether the average replaced the best epoch's weights. `packing`: the
    packed path's check of itself (loop.check_packing), where batches were packed."""

    best_epoch: int
    history: list[dict]
    best_row: dict
    val_logits: np.ndarray
    test_logits: np.ndarray | None
    state_dict: dict
    seconds: float
    resumed_from: dict | None = None
    swa: dict | None = None
    packing: dict | None = None


def fit_fold(cfg: Config, model: TextMetaClassifier, fold: Fold, console: Console, d: Dist = SINGLE) -> FoldResult:
    """Train one fold with early stopping (resuming from its checkpoint when that holds one); return the best
    epoch's weights, OOF logits and test logits. Under DDP (`d` from torchrun) train.batch_size is per
    process, every rank returns the same result and only rank 0 saves checkpoints."""
    started = time.perf_counter()
    rt = runtime(cfg.train, model, fold, d)
    saved = fold.checkpoint.load() if fold.checkpoint else None
    state, rng = set_up(cfg.train, model, fold, rt, fit_norm=saved is None)  # a checkpoint holds the fitted map
    resumed_from = restore(state, saved, fold, rt, console)
    packing = check_packing(model, fold.train, fold.pad_id, rt.device, rt.amp, console, f"fold {fold.index}")
    weights = row_weights(cfg.train, fold.train.y, model.out.out_features)

    def save() -> None:
        if fold.checkpoint and d.is_main:
            fold.checkpoint.save(state)

    with make_progress(console) as progress:
        while not state.fit.finished:
            t0, epoch = time.perf_counter(), state.fit.epoch
            rng.bit_generator.state = state.fit.epoch_rng
            shares = epoch_batches(fold.train, cfg.train, rng, d, weights)
            train_loss = train_one_epoch(state, fold.train, shares, rt, progress, save)
            row = {"epoch": epoch, "train_loss": train_loss}
            row, improved = validate(state, fold, rt, progress, row, t0) if fold.val else keep_last(state, row, t0)
            end_epoch(state, fold, rt, row, improved, console)
            state.fit = FitState(epoch=epoch + 1, epoch_rng=rng.bit_generator.state, history=state.fit.history,
                                 finished=state.stopper.should_stop or epoch >= cfg.train.epochs)
            save()
        if state.best_state is None:
            raise CompError(f"fold {fold.index}: validation {rt.tcfg.monitor} was not finite in any epoch (training "
                            "diverged): lower train.encoder_lr / train.head_lr or use train.precision = \"fp32\"")
        best = state.stopper.best_epoch if fold.val else len(state.fit.history)
        best_row = state.fit.history[best - 1]
        swa = average_epochs(state, fold, rt, progress, best_row) if state.snapshots and fold.val else None
        if swa and swa["kept"]:
            best_row = swa["row"]
        test_logits = finish(state, fold, rt, progress)
    return FoldResult(best, state.fit.history, best_row, state.best_val, test_logits,
                      state.best_state, time.perf_counter() - started, resumed_from, swa, packing)


def runtime(tcfg: TrainConfig, model: TextMetaClassifier, fold: Fold, d: Dist) -> Runtime:
    """The fold's device (under DDP on GPUs, this rank's), autocast dtype and loss."""
    device = resolve_device(tcfg)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    loss_fn = make_loss(tcfg, fold.train.y, model.out.out_features, device)
    if fold.train.soft is not None:
        loss_fn = Distilled(loss_fn, tcfg.distill_weight, tcfg.temperature, model.task)
    return Runtime(tcfg, device, resolve_precision(tcfg, device), fold.pad_id, loss_fn, d, fold.index)


def set_up(tcfg: TrainConfig, model: TextMetaClassifier, fold: Fold, rt: Runtime,
           fit_norm: bool = True) -> tuple[TrainState, np.random.Generator]:
    """A fresh training state on the fold's device (model.text_norm fitted unless `fit_norm` is false: a resumed
    fold loads it), and the generator that draws each epoch's batch order."""
    seed = tcfg.seed + fold.index
    model.set_target_moments(fold.train.y)
    init_wide(model, fold.train.meta, fold.train.y, model.out.out_features, tcfg.loss == "balanced_ce", seed)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    if rt.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use tensor cores
        torch.backends.cudnn.allow_tf32 = True
    model.to(rt.device)
    if fit_norm:
        fit_text_norm(model, fold.train, rt, np.random.default_rng(seed))
    if tcfg.gradient_checkpointing:
        enable_checkpointing(model)
    if tcfg.compile:
        model.encoder.forward = torch.compile(model.encoder.forward, dynamic=True)  # keeps state_dict keys
    trained = model
    if rt.d.enabled:  # DDP broadcasts rank 0's initial weights; dropout draws its own masks on each rank
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.d.local_rank] if rt.device.type == "cuda" else None)
        torch.manual_seed(seed + 7919 * rt.d.rank)
    optimizer = make_optimizer(model, tcfg)
    total_steps = planned_steps(fold.train, tcfg, np.random.default_rng(seed), rt.d)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp == torch.float16)
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    stopper = EarlyStopping(tcfg.monitor, tcfg.patience)
    snapshots = Snapshots(tcfg.swa, tcfg.swa_epochs, stopper.mode) if tcfg.swa != "off" else None
    state = TrainState(model, trained, optimizer, scheduler, scaler, ema, stopper,
                       FitState(epoch_rng=rng.bit_generator.state), snapshots=snapshots)
    return state, rng


TEXT_NORM_ROWS = 512  # the training rows whose pooled vectors give model.text_norm's moments
# A feature is magnified at most 1/TEXT_NORM_FLOOR times against the vector's typical magnitude: one that barely
# varies between rows (a randomly initialised encoder's) is not blown up into noise
TEXT_NORM_FLOOR = 0.05


@torch.no_grad()
def fit_text_norm(model: TextMetaClassifier, rows: Rows, rt: Runtime, rng: np.random.Generator) -> None:
    """model.text_norm = "fitted": the pooled text vector's mean and standard deviation per feature over up to
    TEXT_NORM_ROWS training rows (a seeded sample), through the pretrained encoder in padded evaluation batches
    (the deviation floored at TEXT_NORM_FLOOR of the vectors' root mean square).
    Every process measures the same rows, so DDP's ranks agree."""
    norm = model.text_norm
    if norm is None:
        return
    norm.center.zero_()
    norm.scale.fill_(1.0)
    index = np.sort(rng.choice(len(rows), min(len(rows), TEXT_NORM_ROWS), replace=False))
    pooled: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda module, inputs, out: pooled.append(inputs[0].float()))
    packs, model.packs = model.packs, False  # padded batches: the packed path is trusted only once checked
    try:
        predict(model, rows.subset(index, rows.meta[index]), rt.tcfg.eval_batch_size, rt.pad_id, rt.device, rt.amp)
    finally:
        hook.remove()
        model.packs = packs
    vectors = torch.cat(pooled)
    var = vectors.var(0, unbiased=False)
    floor = TEXT_NORM_FLOOR ** 2 * vectors.pow(2).mean() + 1e-12  # (5% of the vector's typical magnitude)²
    norm.center.copy_(vectors.mean(0))
    norm.scale.copy_((var + floor).sqrt())


def enable_checkpointing(model: TextMetaClassifier) -> None:
    """The encoder's own gradient checkpointing: its blocks' activations are recomputed in the backward pass
    (the random generators' states restored, so dropout draws the same masks) instead of kept."""
    if not getattr(model.encoder, "supports_gradient_checkpointing", False):
        raise CompError(f"train.gradient_checkpointing: {type(model.encoder).__name__} does not support it; "
                        "set it to false")
    encoder, kwargs = model.encoder, {"use_reentrant": False}
    if hasattr(encoder, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def restore(state: TrainState, saved: dict | None, fold: Fold, rt: Runtime, console: Console) -> dict | None:
    """Load the fold's resume checkpoint (`saved`, None: it holds none of this fold) into state; where it
    resumed."""
    if saved is None:
        return None
    state.load_blob(saved, rt.device)
    fit = state.fit
    if not rt.d.is_main:  # the checkpoint holds rank 0's generators
        torch.manual_seed(rt.tcfg.seed + fold.index + 7919 * rt.d.rank + 104729 * fit.epoch + fit.step)
    console.print(f"fold {fold.index}: resuming from {fold.checkpoint.path} at epoch {fit.epoch}, step {fit.step}")
    return {"epoch": fit.epoch, "step": fit.step}


def validate(state: TrainState, fold: Fold, rt: Runtime, progress: Progress, row: dict,
             t0: float) -> tuple[dict, bool]:
    """Score the validation rows (with the EMA's weights when there is one), add the epoch's metrics row to
    the history and keep the weights when they are the best so far (and among the epochs train.swa keeps)."""
    tcfg = rt.tcfg
    with state.ema.applied(state.model) if state.ema else contextlib.nullcontext():
        scores, val_logits = score_validation(state, fold, rt, progress)
        row = {**row, **scores, "seconds": round(time.perf_counter() - t0, 2)}
        state.fit.history.append(row)
        improved = state.stopper.step(row[tcfg.monitor], row["epoch"])
        if improved:
            state.keep_best(val_logits)
        if state.snapshots:
            state.snapshots.add(state.model, row["epoch"], row[tcfg.monitor])
    return row, improved


def keep_last(state: TrainState, row: dict, t0: float) -> tuple[dict, bool]:
    """A refit's epoch (no validation rows): its row, and its weights (the EMA's, when there is one) kept as
    the ones to predict with."""
    row = {**row, "seconds": round(time.perf_counter() - t0, 2)}
    state.fit.history.append(row)
    with state.ema.applied(state.model) if state.ema else contextlib.nullcontext():
        state.keep_best(None)
    return row, True


def score_validation(state: TrainState, fold: Fold, rt: Runtime, progress: Progress) -> tuple[dict, np.ndarray]:
    """The validation loss and metrics of the model's current weights, and its validation logits."""
    val_logits = predict(state.model, fold.val, rt.tcfg.eval_batch_size, rt.pad_id, rt.device, rt.amp, progress,
                         f"fold {fold.index} validate", rt.d)
    m = metrics.score(fold.val.y, val_logits, state.model.task)
    return {"val_loss": validation_loss(rt.tcfg, rt.loss_fn, fold.val, val_logits, m), **metrics.validation_row(m)}, val_logits


def average_epochs(state: TrainState, fold: Fold, rt: Runtime, progress: Progress, best_row: dict) -> dict | None:
    """train.swa: average the kept epochs' weights. 'last': all of them at once. 'soup' (greedy soup): from the
    best epoch on, each next-best epoch joins when the average's validation value does not worsen. An average
    replaces the best epoch's weights (and OOF logits) only when its monitored value is at least as good.
    None when fewer than two epochs were kept (early stopping ended the fold sooner)."""
    snaps, monitor, mode = state.snapshots, rt.tcfg.monitor, state.stopper.mode
    if len(snaps.kept) < 2:
        return None
    ranked = snaps.ranked()
    chosen, row, logits, weights = ranked[:1], best_row, None, None
    for item in [snaps.kept] if snaps.mode == "last" else ranked[1:]:
        candidate = item if snaps.mode == "last" else [*chosen, item]
        average = average_weights([s["weights"] for s in candidate])
        state.model.load_state_dict(average)
        scores, val_logits = score_validation(state, fold, rt, progress)
        if improves(scores[monitor], row[monitor], mode, ties=True):
            chosen, row, logits, weights = candidate, scores, val_logits, average
    if weights is not None:
        state.best_state, state.best_val = weights, logits
    epochs = sorted(s["epoch"] for s in chosen)
    return {"mode": snaps.mode, "epochs": epochs, "kept": weights is not None, "row": {"epochs": epochs, **row}}


def end_epoch(state: TrainState, fold: Fold, rt: Runtime, row: dict, improved: bool, console: Console) -> None:
    """Report the epoch, and let the fold's hook see it."""
    console.print(f"fold {fold.index} epoch {row['epoch']}: loss {row['train_loss']:.4f}  {metrics.row_line(row)}  "
                  f"{row['seconds']:.1f}s{'  *' if improved else ''}", highlight=False)
    if fold.on_epoch:
        fold.on_epoch(row)
    if state.stopper.should_stop:
        console.print(f"fold {fold.index}: early stop, no {rt.tcfg.monitor} gain for {rt.tcfg.patience} epoch(s)")


def finish(state: TrainState, fold: Fold, rt: Runtime, progress: Progress) -> np.ndarray | None:
    """Load the best weights and predict the test rows with them."""
    state.model.load_state_dict(state.best_state)
    if fold.test is None:
        return None
    return predict(state.model, fold.test, rt.tcfg.eval_batch_size, rt.pad_id, rt.device, rt.amp, progress,
                   f"fold {fold.index} predict test", rt.d)
