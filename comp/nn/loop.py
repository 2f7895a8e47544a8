"""The loop: one training epoch over length-bucketed batches, and prediction over length-sorted ones."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from comp.config import TrainConfig
from comp.errors import CompError
from comp.nn.batching import Rows, ahead, batch_maker, inference_batches, release_free_memory
from comp.nn.distributed import SINGLE, Dist
from comp.nn.hardware import eval_rows
from comp.nn.model import TextMetaClassifier
from comp.nn.state import AWP, TrainState


def make_progress(console: Console) -> Progress:
    """A rich progress bar; silent when the console is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@dataclass(frozen=True)
class Runtime:
    """How a fold's loop runs: its settings, device, autocast dtype (None: fp32), padding id, loss, process
    group, and the fold's number (for the progress bar)."""

    tcfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None
    pad_id: int
    loss_fn: nn.Module
    d: Dist = SINGLE
    fold: int = 0


class RunningLoss:
    """The summed training loss and rows of an epoch so far, on the device (read back only to report).
    Under DDP rank 0 carries the sums restored from a checkpoint; the other ranks count from zero."""

    def __init__(self, loss_sum: float, seen: int, rt: Runtime):
        self.rt = rt
        self.total = torch.tensor(loss_sum if rt.d.is_main else 0.0, dtype=torch.float32, device=rt.device)
        self.seen = seen if rt.d.is_main else 0

    def add(self, loss: torch.Tensor, rows: int) -> None:
        self.total += loss.detach() * rows
        self.seen += rows

    def summed(self) -> tuple[float, int]:
        """The sums over every rank."""
        loss_sum, n = self.rt.d.sum(float(self.total.item()), self.seen)
        return loss_sum, int(n)

    def restart_from(self, loss_sum: float, n: int) -> None:
        self.total.fill_(loss_sum if self.rt.d.is_main else 0.0)
        self.seen = n if self.rt.d.is_main else 0


def train_one_epoch(state: TrainState, rows: Rows, shares: list[tuple[np.ndarray, float]], rt: Runtime,
                    progress: Progress, on_checkpoint=None) -> float:
    """One pass over this rank's shares of the epoch's batches (from state.fit.step on, when resuming);
    returns the mean training loss over every rank's rows. Each share's mean loss is scaled by its factor
    (distributed.shard_batches); the gradients of grad_accum_steps batches are summed before each optimizer
    step, and under DDP synchronised only then. `on_checkpoint` is called every train.checkpoint_every
    steps with the running sums in state.fit."""
    fit, tcfg = state.fit, rt.tcfg
    ddp = isinstance(state.trained, nn.parallel.DistributedDataParallel)
    state.trained.train()
    task = progress.add_task(f"fold {rt.fold} epoch {fit.epoch}/{tcfg.epochs}", total=len(shares),
                             completed=fit.step, info="")
    y = torch.from_numpy(rows.y).to(rt.device)
    soft = None if rows.soft is None else torch.from_numpy(rows.soft).to(rt.device)

    def objective(out: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        return rt.loss_fn(out, y[index]) if soft is None else rt.loss_fn(out, y[index], soft[index])
    longest = rows.longest  # widths rounded up stay within the rows' own longest window
    running = RunningLoss(fit.loss_sum, fit.seen, rt)
    awp = (AWP(state.model, tcfg.awp_lr, tcfg.awp_eps, tcfg.awp_params)
           if tcfg.awp_lr > 0 and fit.epoch >= tcfg.awp_start_epoch else None)
    steps = range(fit.step + 1, len(shares) + 1)
    make = batch_maker(rows, rt.pad_id, rt.device, state.model.packs, tcfg.pad_to_multiple_of, longest)
    batches = ahead(lambda step: make(shares[step - 1][0]), steps, rt.device)
    for step, (input_ids, mask, meta, *owner) in zip(steps, batches, strict=True):
        index, scale = shares[step - 1]
        boundary = step % tcfg.grad_accum_steps == 0 or step == len(shares)
        with state.trained.no_sync() if ddp and not boundary else contextlib.nullcontext():
            loss = objective(state.trained(input_ids, mask, meta, rt.amp, *owner), index)
            state.scaler.scale(loss * scale).backward()
            if awp is not None:  # the loss at the perturbed weights adds its gradient, then the weights return
                awp.perturb()
                adversarial = objective(state.trained(input_ids, mask, meta, rt.amp, *owner), index)
                state.scaler.scale(adversarial * scale).backward()
                awp.restore()
        if boundary:
            state.optimizer_step(tcfg.grad_clip)
        running.add(loss, len(index))
        if step % tcfg.log_every == 0 or step == len(shares):
            # the only host sync: every log_every steps, for the running loss on the progress bar
            progress.update(task, completed=step, info=f"loss {running.total.item() / running.seen:.4f}")
            if rt.device.type == "cpu":
                release_free_memory()
        else:
            progress.update(task, completed=step)
        if (on_checkpoint and tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0
                and step % tcfg.grad_accum_steps == 0 and step < len(shares)):
            fit.step, (fit.loss_sum, fit.seen) = step, running.summed()  # rank 0's checkpoint holds every rank's sums
            running.restart_from(fit.loss_sum, fit.seen)
            on_checkpoint()
    progress.remove_task(task)
    loss_sum, n = running.summed()
    return float(loss_sum / max(n, 1))


@torch.inference_mode()
def predict(model: TextMetaClassifier, rows: Rows, batch_size: int | str, pad_id: int, device: torch.device,
            amp_dtype: torch.dtype | None, progress: Progress | None = None, description: str = "predict",
            d: Dist = SINGLE) -> np.ndarray:
    """fp32 logits for every row, in the rows' original order. Under DDP each rank predicts every
    world-th row of the length order and every rank gets all the logits back."""
    model.eval()
    out = np.zeros((len(rows), model.out.out_features), dtype=np.float32)
    batches = inference_batches(rows.lengths, eval_rows(batch_size, device), d, rows.windows)
    mine = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    task = progress.add_task(description, total=len(batches), info="") if progress else None
    made = ahead(batch_maker(rows, pad_id, device, model.packs), batches, device)
    outputs = []  # kept on the device: one copy back at the end, no host sync per batch
    for step, (input_ids, mask, meta, *owner) in enumerate(made, 1):
        outputs.append(model(input_ids, mask, meta, amp_dtype, *owner).float())
        if progress:
            progress.update(task, completed=step)
    if outputs:
        out[mine] = torch.cat(outputs).cpu().numpy()
    if progress:
        progress.remove_task(task)
    if d.enabled:
        parts = d.gather((mine, out[mine]))
        covered = np.concatenate([index for index, _ in parts])
        if len(covered) != len(rows) or not np.array_equal(np.sort(covered), np.arange(len(rows))):
            raise CompError(f"{description}: the ranks' predictions do not cover every row exactly once")
        for index, logits in parts:
            out[index] = logits
    return out


# How far packed logits may stray from padded ones before the packed path is taken to be wrong: in fp32 the
# tolerance of the CPU tests; in half precision two attention kernels round differently, by about the dtype's step.
PACKING_TOLERANCE = {None: (1e-5, 1e-4), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2)}


@torch.inference_mode()
def check_packing(model: TextMetaClassifier, rows: Rows, pad_id: int, device: torch.device,
                  amp_dtype: torch.dtype | None, console: Console, where: str) -> dict | None:
    """A packed model checks its path once before it is trusted: the logits of the first rows, in eval mode,
    packed against padded. Beyond PACKING_TOLERANCE it keeps padded batches from here on and says so in one
    line. Returns what metrics.json records (None where batches are not packed)."""
    if not model.packs or not len(rows):
        return None
    index, training = np.arange(min(len(rows), 8)), model.training
    model.eval()
    packed, padded = (model(*batch_maker(rows, pad_id, device, on)(index), amp_dtype).float() for on in (True, False))
    model.train(training)
    atol, rtol = PACKING_TOLERANCE.get(amp_dtype, PACKING_TOLERANCE[torch.bfloat16])
    difference = float((packed - padded).abs().max())
    trusted = bool(torch.all((packed - padded).abs() <= atol + rtol * padded.abs()))
    if not trusted:
        model.packs = False
        console.print(f"{where}: packed batches gave logits up to {difference:.3g} away from padded ones (tolerance "
                      f"{atol:g} + {rtol:g}·|logit|): padded batches from here on", highlight=False)
    return {"packed": trusted, "max_difference": difference, "rows": len(index)}
