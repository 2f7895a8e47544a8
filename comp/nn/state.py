"""Everything a fold's training changes and its resume checkpoint restores, as one object: the model, the
optimizer and its LR schedule, the gradient scaler, the EMA of the weights, the early stopper, where the loop
stands, the best weights so far, the epochs' weights kept for averaging (train.swa), and the random generators' states."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from comp.artifacts import atomic_path
from comp.config import MONITORS, TrainConfig
from comp.errors import CompError, OutOfTime
from comp.nn.model import TextMetaClassifier, encoder_layers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encoder_lr_scale(name: str, n_layers: int, decay: float) -> float:
    """Layer-wise lr decay: block i of n gets decay**(n - i), the embeddings decay**(n + 1), anything
    above the blocks (a final norm) 1."""
    if decay == 1.0:
        return 1.0
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    if m:
        return decay ** (n_layers - int(m.group(1)))
    return decay ** (n_layers + 1) if "embed" in name else 1.0


def make_optimizer(model: TextMetaClassifier, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the encoder and the head at their own learning rates (the encoder's decaying layer by
    layer from the top with train.layer_decay < 1); no weight decay on biases and norms. Build it after the
    model is on its device: the fused implementation needs the parameters where they will be trained."""
    groups: dict[tuple, dict] = {}
    n_layers = len(encoder_layers(model.encoder)) if tcfg.layer_decay < 1.0 else 0
    for part, lr, decayed in ((model.encoder, tcfg.encoder_lr, True), (model.head_modules(), tcfg.head_lr, False)):
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            scale = encoder_lr_scale(name, n_layers, tcfg.layer_decay) if decayed else 1.0
            wd = 0.0 if p.ndim < 2 or "norm" in name.lower() else tcfg.weight_decay
            groups.setdefault((lr * scale, wd), {"params": [], "lr": lr * scale, "weight_decay": wd})["params"].append(p)
    if tcfg.optimizer == "adamw_8bit":  # its moments in 8 bits: a quarter of AdamW's optimizer memory
        return optimizer_class(tcfg)(list(groups.values()))
    params = [p for g in groups.values() for p in g["params"]]
    # one fused kernel for every tensor (about 10x faster than the per-tensor loop on a CPU); needs one device
    fused = len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(list(groups.values()), fused=fused or None)


def optimizer_class(tcfg: TrainConfig) -> type[torch.optim.Optimizer]:
    """train.optimizer's class: torch's AdamW, or bitsandbytes' AdamW8bit (refused in one line where that
    package is not installed; check it before a run writes anything)."""
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise CompError("train.optimizer = \"adamw_8bit\" needs the bitsandbytes package, which is not installed "
                        "(pip install bitsandbytes; it runs on CUDA GPUs): install it or set train.optimizer = "
                        "\"adamw\"") from None
    return bitsandbytes.optim.AdamW8bit




class AWP:
    """Adversarial weight perturbation (Wu et al., 2020; the Feedback Prize winners' form): after a batch's
    backward pass every weight matrix moves by lr · |W| · ∇W / |∇W| (norms over the matrix), each element kept
    within eps · |w| of where it was; the batch's loss is taken again there and its gradient added to the
    batch's; then the weights are put back exactly."""

    def __init__(self, model: TextMetaClassifier, lr: float, eps: float, which: str = "all"):
        """`which` (train.awp_params): every weight matrix ("all"), the encoder's ("encoder"), or only the input
        token embeddings ("embeddings")."""
        embedding = model.encoder.get_input_embeddings().weight
        chosen = {"all": lambda n, p: True, "encoder": lambda n, p: n.startswith("encoder."),
                  "embeddings": lambda n, p: p is embedding}[which]
        self.params = [(n, p) for n, p in model.named_parameters()
                       if p.requires_grad and p.ndim >= 2 and "weight" in n and chosen(n, p)]
        self.lr, self.eps = lr, eps
        self.backup: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def perturb(self) -> None:
        for name, p in self.params:
            if p.grad is None:
                continue
            original = self.backup[name] = p.detach().clone()
            step = torch.nan_to_num(self.lr * p.grad * (original.norm() / (p.grad.norm() + 1e-12)))
            bound = self.eps * original.abs()
            p.copy_(torch.minimum(torch.maximum(original + step, original - bound), original + bound))

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params:
            if name in self.backup:
                p.copy_(self.backup[name])
        self.backup = {}


class EMA:
    """An exponential moving average of the model's floating-point weights (warm-up: the decay grows as
    min(decay, (1 + t) / (10 + t)) so early weights do not linger); evaluation swaps it in."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if k in self.names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        torch._foreach_lerp_([self.shadow[k] for k in self.names], [state[k].float() for k in self.names], 1.0 - d)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The model with the averaged weights inside the block, its own weights back after it."""
        state = model.state_dict()
        backup = {k: state[k].detach().clone() for k in self.names}
        model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in self.shadow.items()}})
        try:
            yield model
        finally:
            model.load_state_dict({**model.state_dict(), **backup})

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        self.updates, self.shadow = d["updates"], d["shadow"]


def improves(value: float, than: float | None, mode: str, ties: bool = False) -> bool:
    """Whether a finite `value` of the monitored quantity beats `than` (None: nothing yet) in direction `mode`;
    `ties`: an equal value counts too."""
    if not math.isfinite(value):
        return False
    if than is None or (ties and value == than):
        return True
    return value < than if mode == "min" else value > than


class EarlyStopping:
    """Tracks the monitored quantity; says when it improved and when patience ran out."""

    def __init__(self, monitor: str, patience: int):
        self.monitor, self.patience, self.mode = monitor, patience, MONITORS[monitor]
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; return True when it is the best so far. A NaN or infinite value is
        never the best (it counts as an epoch without improvement)."""
        better = improves(value, self.best, self.mode)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = d["best"], d["best_epoch"], d["bad_epochs"]


class Snapshots:
    """train.swa: end-of-epoch weights kept on the CPU, with the epoch and its monitored value. 'last' keeps the
    last `n` epochs; 'soup' the best `n` by the monitored value."""

    def __init__(self, mode: str, n: int, direction: str):
        self.mode, self.n, self.direction = mode, n, direction
        self.kept: list[dict] = []

    def add(self, model: nn.Module, epoch: int, value: float) -> None:
        """The weights just validated (the EMA's while it is applied), at `epoch` with monitored `value`."""
        self.kept.append({"epoch": epoch, "value": value, "weights": cpu_copy(model)})
        if self.mode == "soup":
            self.kept = self.ranked()
        self.kept = self.kept[-self.n:] if self.mode == "last" else self.kept[:self.n]

    def ranked(self) -> list[dict]:
        """The kept snapshots, best monitored value first (non-finite values last); ties: the later epoch."""
        def key(s):
            v = s["value"]
            return (not math.isfinite(v), v if self.direction == "min" else -v, -s["epoch"])
        return sorted(self.kept, key=key)

    def state_dict(self) -> list[dict]:
        return self.kept

    def load_state_dict(self, kept: list[dict]) -> None:
        self.kept = kept


def cpu_copy(model: nn.Module) -> dict:
    """A copy of the model's state dict in CPU memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def average_weights(states: list[dict]) -> dict:
    """The element-wise mean of state dicts' floating-point tensors (in fp32, cast back); other entries (integer
    buffers) from the first."""
    first = states[0]
    return {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in first.items()}


@dataclass
class FitState:
    """Where a fold's training stands; with the model and optimizer, everything needed to resume it exactly."""

    epoch: int = 1                  # the epoch in progress (or the next to start)
    step: int = 0                   # batches of that epoch already done
    loss_sum: float = 0.0           # summed training loss of those batches
    seen: int = 0                   # rows in those batches
    epoch_rng: dict | None = None   # the batch-order generator's state at the start of `epoch`
    history: list = field(default_factory=list)
    finished: bool = False


@dataclass
class TrainState:
    """A fold's training state. `trained` is what the loop calls: the model, or its DDP wrapper."""

    model: TextMetaClassifier
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: EMA | None
    stopper: EarlyStopping
    fit: FitState
    best_state: dict | None = None
    best_val: np.ndarray | None = None
    snapshots: Snapshots | None = None

    @classmethod
    def bare(cls, model: TextMetaClassifier, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
        """A state for a loop without resume, EMA, gradient scaling or early stopping (benchmarks, tests)."""
        return cls(model, model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), None,
                   EarlyStopping("val_loss", 1), FitState())

    def optimizer_step(self, grad_clip: float) -> None:
        """Apply the summed gradients (unscaled and clipped first), advance the schedule, update the EMA."""
        if grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained.parameters(), grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)

    def keep_best(self, val_logits: np.ndarray) -> None:
        """The weights just validated (the EMA's while it is applied) are the best so far."""
        self.best_state = cpu_copy(self.model)
        self.best_val = val_logits

    def to_blob(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "snapshots": self.snapshots.state_dict() if self.snapshots else None, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "fit": dataclasses.asdict(self.fit),
                "stopper": self.stopper.state_dict(), "best_state": self.best_state,
                "best_val": None if self.best_val is None else torch.from_numpy(self.best_val),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load_blob(self, blob: dict, device: torch.device) -> None:
        """Restore what to_blob saved, the random generators included."""
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scaler.load_state_dict(blob["scaler"])
        self.fit = FitState(**blob["fit"])
        self.stopper.load_state_dict(blob["stopper"])
        self.best_state = blob["best_state"]
        self.best_val = None if blob["best_val"] is None else blob["best_val"].numpy()
        if self.ema and blob.get("ema"):
            self.ema.load_state_dict({"updates": blob["ema"]["updates"],
                                      "shadow": {k: v.to(device) for k, v in blob["ema"]["shadow"].items()}})
        if self.snapshots and blob.get("snapshots"):
            self.snapshots.load_state_dict(blob["snapshots"])
        random.setstate(_as_tuple(blob["rng"]["python"]))
        torch.set_rng_state(blob["rng"]["torch"])
        if blob["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng"]["cuda"])


class Checkpoint:
    """A resume checkpoint saved with what it belongs to: a fold's `last` checkpoint (a TrainState; its identity
    the config, inputs, fold, split and processes), or comp.pretrain's. A checkpoint of anything else is
    ignored; an unreadable one is a CompError that ends with `fix`. `deadline` (time.monotonic()): a save after it
    raises OutOfTime, the checkpoint written."""

    def __init__(self, path: Path, identity: dict, fix: str = "delete it to start the fold over, or pass --force",
                 deadline: float | None = None):
        self.path, self.identity, self.fix, self.deadline = path, identity, fix, deadline

    def save(self, state: TrainState) -> None:
        """Write the checkpoint atomically (then stop, past the deadline)."""
        self.save_blob(state.to_blob())
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(f"the time limit was reached: {self.path.parent.name} stopped at its checkpoint "
                            f"(epoch {state.fit.epoch}, step {state.fit.step}); rerun the command to continue it")

    def save_blob(self, blob: dict) -> None:
        """Write `blob` (tensors, numbers, strings: what torch.load reads back with weights_only) and the identity
        atomically."""
        with atomic_path(self.path) as tmp:
            torch.save({"identity": self.identity, **blob}, tmp)

    def load(self) -> dict | None:
        """The saved checkpoint, or None when there is none or it belongs to another config / split."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read it means a broken file
            raise CompError(f"checkpoint {self.path} is unreadable ({exc.__class__.__name__}): {self.fix}") from None
        if blob.get("identity") != self.identity:
            return None
        return blob

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def _as_tuple(x):
    """random.setstate needs tuples where a checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
