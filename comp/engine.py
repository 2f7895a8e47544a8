"""The training core: tokenize once, length-bucketed batches with dynamic padding, one explicit loop per fold."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from comp import metrics
from comp.artifacts import atomic_path
from comp.config import MONITORS, Config, TrainConfig
from comp.distributed import SINGLE, Dist, shard_batches, shard_rows
from comp.errors import CompError
from comp.model import TextMetaClassifier, encoder_layers, init_wide


@dataclass
class Rows:
    """Tokenized rows (no padding) with their metadata matrix and, for training rows, labels."""

    tokens: list[np.ndarray]
    meta: np.ndarray
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))

    def subset(self, index: np.ndarray, meta: np.ndarray) -> Rows:
        """Rows at `index` with a freshly encoded metadata matrix."""
        y = None if self.y is None else self.y[index]
        return Rows([self.tokens[i] for i in index], meta, y)

    def __add__(self, other: Rows) -> Rows:
        """These rows followed by the other's (both labelled)."""
        return Rows(self.tokens + other.tokens, np.concatenate([self.meta, other.meta]), np.concatenate([self.y, other.y]))


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, chunk: int = 2048,
             progress: Progress | None = None) -> list[np.ndarray]:
    """Token ids of each text, truncated to max_length, without padding; batched through the fast tokenizer."""
    out: list[np.ndarray] = []
    task = progress.add_task("tokenize", total=len(texts), info="") if progress else None
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
        out += [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]
        if progress:
            progress.update(task, completed=len(out))
    if progress:
        progress.remove_task(task)
    return out


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides how the tokenizer splits text (vocabulary, normalizer, specials)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state the tokenizer keeps from its last use
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached_tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                    cache_dir: Path | None, progress: Progress | None = None) -> tuple[list[np.ndarray], bool]:
    """tokenize(), through an on-disk cache keyed by tokenizer identity, max_length and the texts;
    returns the token ids and whether the cache answered."""
    if cache_dir is None:
        return tokenize(tokenizer, texts, max_length, progress=progress), False
    h = hashlib.sha256(f"{tokenizer_identity(tokenizer)}|{max_length}|{len(texts)}|".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    path = cache_dir / f"tokens-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                flat, offsets = z["ids"], z["offsets"]
            return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)], True
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a broken cache file is rebuilt below
    tokens = tokenize(tokenizer, texts, max_length, progress=progress)
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in tokens])
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, ids=flat.astype(np.int32), offsets=offsets)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(tokens))], False


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50,
                  max_tokens: int = 0) -> list[np.ndarray]:
    """Every row once: shuffle, sort pools of `pool` batches by length, cut into batches, shuffle the batches.
    max_tokens > 0 also caps each batch's padded size (rows × its longest row): long rows come in smaller
    batches."""
    perm = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(perm), batch_size * pool):
        chunk = perm[start:start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        if max_tokens <= 0:
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            continue
        begin = 0
        for i in range(1, len(chunk) + 1):  # sorted: the row just added is the batch's longest
            if i == len(chunk) or i - begin >= batch_size or (i + 1 - begin) * lengths[chunk[i]] > max_tokens:
                batches.append(chunk[begin:i])
                begin = i
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(lengths: np.ndarray, tcfg: TrainConfig, rng: np.random.Generator,
                  d: Dist = SINGLE) -> list[tuple[np.ndarray, float]]:
    """One epoch's batches for this rank, each with the factor its mean loss is scaled by (see shard_batches);
    draws from rng."""
    batches = train_batches(lengths, tcfg.batch_size * d.world, rng, max_tokens=tcfg.max_tokens_per_batch * d.world)
    return shard_batches(batches, d, tcfg.grad_accum_steps)


def planned_steps(lengths: np.ndarray, tcfg: TrainConfig, rng: np.random.Generator, d: Dist = SINGLE) -> int:
    """The optimizer steps of train.epochs epochs: the epochs' batch lists drawn as training will draw them
    (rng seeded as the loop's), so token budgets and DDP merging are counted exactly."""
    return sum(math.ceil(len(epoch_batches(lengths, tcfg, rng, d)) / tcfg.grad_accum_steps) for _ in range(tcfg.epochs))


def inference_batches(lengths: np.ndarray, batch_size: int, d: Dist = SINGLE) -> list[np.ndarray]:
    """Rows sorted by length, cut into batches (the caller restores the original order); under DDP only
    this rank's share, every world-th row of that order."""
    order = shard_rows(np.argsort(lengths, kind="stable"), d)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: Rows, index: np.ndarray, pad_id: int, device: torch.device, multiple: int = 1,
            cap: int = 0) -> tuple[torch.Tensor, ...]:
    """Pad the chosen rows to their longest one, rounded up to `multiple` tokens but never past `cap`;
    returns input_ids, attention_mask, meta."""
    seqs = [rows.tokens[i] for i in index]
    width = max(len(s) for s in seqs)
    if multiple > 1:
        width = max(width, min(-(-width // multiple) * multiple, cap))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    tensors = (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(rows.meta[index]))
    if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_free_memory() -> None:
    """Hand the free pages inside glibc's heaps back to the system. Every step allocates activations of
    new shapes, and the heap fragments under that: without this a full-data demo fold grew past 4 GB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resolve_device(tcfg: TrainConfig) -> torch.device:
    """auto → cuda when available, else cpu; asking for an absent GPU is a CompError."""
    if tcfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tcfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompError(f"train.device = {tcfg.device!r} but no CUDA GPU is visible; use --set train.device=cpu")
    return torch.device(tcfg.device)


NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def native_precision(device_type: str, cuda_capability: tuple[int, int] | None, cpu_flags: set[str]) -> torch.dtype | None:
    """The autocast dtype the hardware runs natively: bf16 on CUDA compute capability >= 8.0 (Ampere and newer)
    and on CPUs with AVX512-BF16 or AMX; fp16 on older GPUs (T4, P100, V100: bf16 there is emulated); else fp32."""
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float16
    return torch.bfloat16 if cpu_flags & NATIVE_BF16_CPU_FLAGS else None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(tcfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the encoder: train.precision, or for "auto" what the hardware runs natively."""
    if tcfg.precision != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.precision]
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return native_precision(device.type, capability, set(cpu_flags()))


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
    params = [p for g in groups.values() for p in g["params"]]
    # one fused kernel for every tensor (about 10x faster than the per-tensor loop on a CPU); needs one device
    fused = len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda")
    return torch.optim.AdamW(list(groups.values()), fused=fused or None)


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)**gamma: easy rows count less (gamma 0 is plain cross-entropy)."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - logp.exp()).pow(self.gamma) * logp).mean()


def make_loss(tcfg: TrainConfig, y: np.ndarray, n_classes: int, device: torch.device) -> nn.Module:
    """train.loss: ce, balanced_ce (classes weighted by n / (k · count), from the fold's training rows) or focal."""
    if tcfg.loss == "focal":
        return FocalLoss(tcfg.focal_gamma)
    if tcfg.loss == "balanced_ce":
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        weight = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
        return nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32, device=device))
    return nn.CrossEntropyLoss()


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


def validation_loss(tcfg: TrainConfig, loss_fn: nn.Module, rows: Rows, logits: np.ndarray, scores: dict) -> float:
    """The training objective on the validation rows: the plain log loss for "ce", else the configured loss
    (class-weighted or focal), so that early stopping selects by what training optimises."""
    if tcfg.loss == "ce":
        return scores["log_loss"]
    with torch.no_grad():
        device = next(iter(loss_fn.buffers()), torch.zeros(0)).device
        value = loss_fn(torch.from_numpy(logits).to(device), torch.from_numpy(rows.y).to(device))
    return float(value)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_progress(console: Console) -> Progress:
    """A rich progress bar; silent when the console is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@dataclass
class FitState:
    """Where a fold's training stands; everything needed, with the model and optimizer, to resume it exactly."""

    epoch: int = 1                  # the epoch in progress (or the next to start)
    step: int = 0                   # batches of that epoch already done
    loss_sum: float = 0.0           # summed training loss of those batches
    seen: int = 0                   # rows in those batches
    epoch_rng: dict | None = None   # the batch-order generator's state at the start of `epoch`
    history: list = field(default_factory=list)
    finished: bool = False


def train_one_epoch(model: TextMetaClassifier, rows: Rows, batches: list[np.ndarray], optimizer, scheduler,
                    loss_fn: nn.Module, tcfg: TrainConfig, pad_id: int, device: torch.device,
                    amp_dtype: torch.dtype | None, progress: Progress, description: str,
                    state: FitState | None = None, on_checkpoint: Callable[[], None] | None = None,
                    scaler: torch.amp.GradScaler | None = None, scales: list[float] | None = None,
                    d: Dist = SINGLE, after_step: Callable[[], None] | None = None) -> float:
    """One pass over the batches (from state.step on, when resuming); returns the mean training loss.
    Gradients of grad_accum_steps batches are summed before each optimizer step. Under DDP (`model`
    wrapped, `d` its job) `batches` are this rank's shares and `scales` weight each share's mean loss;
    the returned loss is the mean over every rank's rows."""
    state = state or FitState()
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    accum = tcfg.grad_accum_steps
    model.train()
    task = progress.add_task(description, total=len(batches), completed=state.step, info="")
    y = torch.from_numpy(rows.y).to(device)
    longest = int(rows.lengths.max()) if len(rows) else 0  # widths rounded up stay within the rows' own longest
    # the sums of a resumed epoch's first steps come from the checkpoint: rank 0 carries them
    total = torch.tensor(state.loss_sum if d.is_main else 0.0, dtype=torch.float32, device=device)
    seen = state.seen if d.is_main else 0
    for step in range(state.step + 1, len(batches) + 1):
        index = batches[step - 1]
        input_ids, mask, meta = collate(rows, index, pad_id, device, tcfg.pad_to_multiple_of, longest)
        boundary = step % accum == 0 or step == len(batches)
        with model.no_sync() if ddp and not boundary else contextlib.nullcontext():  # DDP syncs at the step only
            logits = model(input_ids, mask, meta, amp_dtype)
            loss = loss_fn(logits, y[index])
            scale = scales[step - 1] if scales else 1.0 / accum
            scaler.scale(loss * scale).backward()
        if boundary:
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step:
                after_step()
        total += loss.detach() * len(index)
        seen += len(index)
        if step % tcfg.log_every == 0 or step == len(batches):
            # the only host sync: every log_every steps, for the running loss on the progress bar
            progress.update(task, completed=step, info=f"loss {total.item() / seen:.4f}")
            if device.type == "cpu":
                release_free_memory()
        else:
            progress.update(task, completed=step)
        if (on_checkpoint and tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step % accum == 0
                and step < len(batches)):
            # under DDP the checkpoint (rank 0's) holds every rank's sums; the other ranks go on from zero
            loss_sum, n = d.sum(float(total.item()), seen)
            state.step, state.loss_sum, state.seen = step, loss_sum, int(n)
            total.fill_(loss_sum if d.is_main else 0.0)
            seen = int(n) if d.is_main else 0
            on_checkpoint()
    progress.remove_task(task)
    loss_sum, n = d.sum(float(total.item()), seen)
    return float(loss_sum / max(n, 1))


@torch.inference_mode()
def predict(model: TextMetaClassifier, rows: Rows, batch_size: int, pad_id: int, device: torch.device,
            amp_dtype: torch.dtype | None, progress: Progress | None = None, description: str = "predict",
            d: Dist = SINGLE) -> np.ndarray:
    """fp32 logits for every row, in the rows' original order. Under DDP each rank predicts every
    world-th row of the length order and every rank gets all the logits back."""
    model.eval()
    out = np.zeros((len(rows), model.out.out_features), dtype=np.float32)
    batches = inference_batches(rows.lengths, batch_size, d)
    mine = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    task = progress.add_task(description, total=len(batches), info="") if progress else None
    for step, index in enumerate(batches, 1):
        input_ids, mask, meta = collate(rows, index, pad_id, device)
        out[index] = model(input_ids, mask, meta, amp_dtype).float().cpu().numpy()
        if progress:
            progress.update(task, completed=step)
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
        better = math.isfinite(value) and (self.best is None or (value < self.best if self.mode == "min"
                                                                  else value > self.best))
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


class Checkpoint:
    """The fold's `last` checkpoint: model, optimizer, scheduler, loop state, best weights so far, RNG states."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.identity = path, identity

    def save(self, model, optimizer, scheduler, scaler, state: FitState, stopper: EarlyStopping,
             best_state: dict | None, best_val: np.ndarray | None, ema: EMA | None = None) -> None:
        """Write the checkpoint atomically."""
        blob = {"identity": self.identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "fit": dataclasses.asdict(state),
                "stopper": stopper.state_dict(), "best_state": best_state,
                "best_val": None if best_val is None else torch.from_numpy(best_val),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        with atomic_path(self.path) as tmp:
            torch.save(blob, tmp)

    def load(self) -> dict | None:
        """The saved checkpoint, or None when there is none or it belongs to another config / split."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read it means a broken file
            raise CompError(f"checkpoint {self.path} is unreadable ({exc.__class__.__name__}): delete it to start "
                            "the fold over, or pass --force") from None
        if blob.get("identity") != self.identity:
            return None
        return blob

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class FoldResult:
    """What fit_fold learned: the best weights and the logits they give."""

    best_epoch: int
    history: list[dict]
    val_logits: np.ndarray
    test_logits: np.ndarray | None
    state_dict: dict
    seconds: float
    resumed_from: dict | None = None


def fit_fold(cfg: Config, model: TextMetaClassifier, train_rows: Rows, val_rows: Rows, test_rows: Rows | None,
             pad_id: int, console: Console, fold: int = 0, checkpoint: Checkpoint | None = None,
             on_epoch: Callable[[dict], None] | None = None, d: Dist = SINGLE) -> FoldResult:
    """Train one fold with early stopping (resuming from `checkpoint` if it holds one); return the best
    epoch's weights, OOF logits and test logits (none without test rows). `on_epoch` sees each epoch's
    metrics and may raise to stop the fold (tuning prunes trials that way). Under DDP (`d` from torchrun)
    train.batch_size is per process, every rank returns the same result and only rank 0 saves checkpoints."""
    tcfg = cfg.train
    started = time.perf_counter()
    device = resolve_device(tcfg)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    amp_dtype = resolve_precision(tcfg, device)
    init_wide(model, train_rows.meta, train_rows.y, model.out.out_features, tcfg.loss == "balanced_ce", tcfg.seed + fold)
    seed_everything(tcfg.seed + fold)
    rng = np.random.default_rng(tcfg.seed + fold)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use tensor cores
        torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    if tcfg.compile:
        model.encoder.forward = torch.compile(model.encoder.forward, dynamic=True)  # keeps state_dict keys
    trained = model
    if d.enabled:  # DDP broadcasts rank 0's initial weights; dropout draws its own masks on each rank
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
        torch.manual_seed(tcfg.seed + fold + 7919 * d.rank)
    optimizer = make_optimizer(model, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    total_steps = planned_steps(train_rows.lengths, tcfg, np.random.default_rng(tcfg.seed + fold), d)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total_steps), total_steps)
    loss_fn = make_loss(tcfg, train_rows.y, model.out.out_features, device)
    ema = EMA(model, tcfg.ema_decay) if tcfg.ema_decay > 0 else None
    stopper = EarlyStopping(tcfg.monitor, tcfg.patience)
    state = FitState(epoch_rng=rng.bit_generator.state)
    best_state, best_val, resumed_from = None, None, None

    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = FitState(**saved["fit"])
        stopper.load_state_dict(saved["stopper"])
        best_state = saved["best_state"]
        best_val = None if saved["best_val"] is None else saved["best_val"].numpy()
        if ema and saved.get("ema"):
            ema.load_state_dict({"updates": saved["ema"]["updates"],
                                 "shadow": {k: v.to(device) for k, v in saved["ema"]["shadow"].items()}})
        random.setstate(_as_tuple(saved["rng"]["python"]))
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        if not d.is_main:  # the checkpoint holds rank 0's generators
            torch.manual_seed(tcfg.seed + fold + 7919 * d.rank + 104729 * state.epoch + state.step)
        resumed_from = {"epoch": state.epoch, "step": state.step}
        console.print(f"fold {fold}: resuming from {checkpoint.path} at epoch {state.epoch}, step {state.step}")

    def save_checkpoint() -> None:
        if checkpoint and d.is_main:
            checkpoint.save(model, optimizer, scheduler, scaler, state, stopper, best_state, best_val, ema)

    lengths = train_rows.lengths
    with make_progress(console) as progress:
        while not state.finished:
            epoch, t0 = state.epoch, time.perf_counter()
            rng.bit_generator.state = state.epoch_rng
            shares = epoch_batches(lengths, tcfg, rng, d)
            batches, scales = [b for b, _ in shares], [w for _, w in shares]
            train_loss = train_one_epoch(trained, train_rows, batches, optimizer, scheduler, loss_fn, tcfg,
                                         pad_id, device, amp_dtype, progress,
                                         f"fold {fold} epoch {epoch}/{tcfg.epochs}", state, save_checkpoint, scaler,
                                         scales, d, (lambda: ema.update(model)) if ema else None)
            with ema.applied(model) if ema else contextlib.nullcontext():  # evaluation sees the averaged weights
                val_logits = predict(model, val_rows, tcfg.eval_batch_size, pad_id, device, amp_dtype, progress,
                                     f"fold {fold} validate", d)
                m = metrics.score(val_rows.y, val_logits)
                row = {"epoch": epoch, "train_loss": train_loss,
                       "val_loss": validation_loss(tcfg, loss_fn, val_rows, val_logits, m),
                       "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                       "seconds": round(time.perf_counter() - t0, 2)}
                state.history.append(row)
                improved = stopper.step(row[tcfg.monitor], epoch)
                if improved:  # the weights validated: the EMA's while it is applied
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    best_val = val_logits
            console.print(f"fold {fold} epoch {epoch}: loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
                          f"acc {row['val_accuracy']:.4f}  macro_f1 {row['val_macro_f1']:.4f}  "
                          f"{row['seconds']:.1f}s{'  *' if improved else ''}", highlight=False)
            if on_epoch:
                on_epoch(row)
            if stopper.should_stop:
                console.print(f"fold {fold}: early stop, no {tcfg.monitor} gain for {tcfg.patience} epoch(s)")
            state = FitState(epoch=epoch + 1, epoch_rng=rng.bit_generator.state, history=state.history,
                             finished=stopper.should_stop or epoch >= tcfg.epochs)
            save_checkpoint()
        if best_state is None:
            raise CompError(f"fold {fold}: validation {tcfg.monitor} was not finite in any epoch (training diverged): "
                            "lower train.encoder_lr / train.head_lr or use train.precision = \"fp32\"")
        model.load_state_dict(best_state)
        test_logits = None if test_rows is None else predict(
            model, test_rows, tcfg.eval_batch_size, pad_id, device, amp_dtype, progress, f"fold {fold} predict test",
            d)
    return FoldResult(stopper.best_epoch, state.history, best_val, test_logits, best_state,
                      time.perf_counter() - started, resumed_from)


def _as_tuple(x):
    """random.setstate needs tuples where a checkpoint may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
