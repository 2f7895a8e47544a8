"""Rows and the batches they are cut into: tokenize once (through an on-disk cache), length-bucketed
training batches, length-sorted inference batches, padding to a batch's longest row."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from transformers import PreTrainedTokenizerBase

from comp.artifacts import atomic_path
from comp.config import TrainConfig
from comp.nn import packing
from comp.nn.distributed import SINGLE, Dist, shard_batches, shard_rows
from comp.tables.read import PAIR, SEGMENT


@dataclass
class Rows:
    """Tokenized rows (no padding) with their metadata matrix and, for training rows, labels (and, when a teacher
    run is distilled, its outputs for these rows: soft targets)."""

    tokens: list[np.ndarray]
    meta: np.ndarray
    y: np.ndarray | None = None
    soft: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))

    @property
    def longest(self) -> int:
        """The longest window of any row (with one window per row: the longest row)."""
        if self.windows is None:
            return int(self.lengths.max()) if len(self) else 0
        return max(int(np.diff(np.concatenate([[-1], np.flatnonzero(t == WINDOW), [len(t)]])).max()) - 1
                   for t in self.tokens)

    @functools.cached_property
    def windows(self) -> np.ndarray | None:
        """How many windows each row holds (model.chunks > 1: windows joined by WINDOW); None when every row is
        one window. Computed once: a Rows' tokens do not change."""
        counts = np.fromiter(((t == WINDOW).sum() + 1 for t in self.tokens), dtype=np.int64, count=len(self.tokens))
        return counts if len(counts) and counts.max() > 1 else None

    def subset(self, index: np.ndarray, meta: np.ndarray) -> Rows:
        """Rows at `index` with a freshly encoded metadata matrix."""
        y = None if self.y is None else self.y[index]
        return Rows([self.tokens[i] for i in index], meta, y)

    def __add__(self, other: Rows) -> Rows:
        """These rows followed by the other's (both labelled)."""
        return Rows(self.tokens + other.tokens, np.concatenate([self.meta, other.meta]), np.concatenate([self.y, other.y]))


WINDOW = -1  # between two windows of one row's token ids (model.chunks > 1); never a token id


@dataclass(frozen=True)
class Truncation:
    """What of a text longer than max_length tokens is kept: its head (the default), its tail, or head_tail: its
    first `head` tokens and as many of its last as still fit (the special tokens always included). chunks > 1:
    up to that many windows of max_length tokens from the head, consecutive ones sharing `stride` tokens."""

    max_length: int
    mode: str = "head"
    head: int = 0
    chunks: int = 1
    stride: int = 0

    @classmethod
    def of(cls, mcfg) -> Truncation:
        """model.max_length, model.truncation and model.head_tokens (0: a quarter of max_length), model.chunks
        and model.stride."""
        return cls(mcfg.max_length, mcfg.truncation, mcfg.head_tokens or mcfg.max_length // 4, mcfg.chunks, mcfg.stride)

    def key(self) -> str:
        base = str(self.max_length) if self.mode == "head" else f"{self.max_length}|{self.mode}|{self.head}"
        return base if self.chunks == 1 else f"{base}|chunks {self.chunks}|{self.stride}"


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: int | Truncation, chunk: int = 2048,
             progress: Progress | None = None) -> list[np.ndarray]:
    """Token ids of each text, truncated to `limit` (max_length, or a Truncation), without padding; batched
    through the fast tokenizer. A text holding tables.PAIR is the two sides of a pair."""
    limit = limit if isinstance(limit, Truncation) else Truncation(limit)
    out: list[np.ndarray] = []
    task = progress.add_task("tokenize", total=len(texts), info="") if progress else None
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        if any(PAIR in t for t in part):  # a text pair: the tokenizer's pair encoding, the longer side cut first
            sides = [t.split(PAIR, 1) if PAIR in t else [t, ""] for t in part]
            enc = tokenizer([a for a, _ in sides], [b for _, b in sides], truncation="longest_first",
                            max_length=limit.max_length, return_attention_mask=False, return_token_type_ids=False)
            out += [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]
        elif any(SEGMENT in t for t in part):  # data.template: the columns around the text kept whole
            out += _templated(tokenizer, part, limit)
        elif limit.chunks > 1:
            out += _windows(tokenizer, part, limit)
        elif limit.mode == "head":
            enc = tokenizer(part, truncation=True, max_length=limit.max_length, return_attention_mask=False,
                            return_token_type_ids=False)
            out += [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]
        else:
            out += _keep_ends(tokenizer, part, limit)
        if progress:
            progress.update(task, completed=len(out))
    if progress:
        progress.remove_task(task)
    return never_empty(out, tokenizer)


def never_empty(tokens: list[np.ndarray], tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
    """Each row at least one token: an empty text under a tokenizer that adds no special token (most decoder
    LLMs) reads as its begin- or end-of-text token, so every row has a position to pool and no batch is empty."""
    if all(len(t) for t in tokens):
        return tokens
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id, tokenizer.unk_token_id]
    stand_in = np.asarray([next(i for i in ids if i is not None)], dtype=np.int32)
    return [t if len(t) else stand_in for t in tokens]


def _keep_ends(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: Truncation) -> list[np.ndarray]:
    """tail / head_tail: each text tokenized whole, its body cut to fit, the tokenizer's own specials around it."""
    prefix, suffix = _specials(tokenizer)
    room = limit.max_length - len(prefix) - len(suffix)
    enc = tokenizer(texts, add_special_tokens=False, truncation=False, return_attention_mask=False,
                    return_token_type_ids=False)
    return [np.asarray(prefix + _cut(ids, room, limit) + suffix, dtype=np.int32) for ids in enc["input_ids"]]


def _cut(ids: list[int], room: int, limit: Truncation) -> list[int]:
    """A text's ids cut to `room` as the truncation mode keeps them: its head, its tail, or both ends."""
    if len(ids) <= room:
        return ids
    head = room if limit.mode == "head" else 0 if limit.mode == "tail" else min(limit.head, room)
    return ids[:head] + ids[len(ids) - (room - head):]


def _templated(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: Truncation) -> list[np.ndarray]:
    """Rendered data.template rows (before SEGMENT text SEGMENT after): the parts tokenized apart, the text cut
    to the room the template's own tokens and the specials leave it (whole rows cut only when those alone do
    not fit)."""
    prefix, suffix = _specials(tokenizer)
    parts = [t.split(SEGMENT) for t in texts]
    enc = tokenizer([p for row in parts for p in row], add_special_tokens=False, truncation=False,
                    return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    out = []
    for i in range(len(texts)):
        before, body, after = enc[3 * i:3 * i + 3]
        room = max(limit.max_length - len(prefix) - len(suffix) - len(before) - len(after), 0)
        ids = prefix + before + _cut(body, room, limit) + after + suffix
        out.append(np.asarray(ids[:limit.max_length], dtype=np.int32))
    return out


def _windows(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: Truncation) -> list[np.ndarray]:
    """chunks > 1: each text tokenized whole and cut into up to `chunks` windows, each within the tokenizer's
    own specials and max_length tokens long, consecutive ones sharing `stride` tokens; joined by WINDOW."""
    prefix, suffix = _specials(tokenizer)
    room = limit.max_length - len(prefix) - len(suffix)
    step = room - limit.stride
    enc = tokenizer(texts, add_special_tokens=False, truncation=False, return_attention_mask=False,
                    return_token_type_ids=False)
    out = []
    for ids in enc["input_ids"]:
        starts = range(0, max(len(ids) - limit.stride, 1), step)[:limit.chunks]
        parts = []
        for start in starts:
            parts += [*prefix, *ids[start:start + room], *suffix, WINDOW]
        out.append(np.asarray(parts[:-1], dtype=np.int32))
    return out


def _specials(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] / [SEP], <s> / </s>, none)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


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


def hash_texts(h, texts: list[str]):
    """`h` (a hashlib object) updated with every text, each ended by a NUL; returned for chaining."""
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h


def cached_tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], limit: int | Truncation,
                    cache_dir: Path | None, progress: Progress | None = None) -> tuple[list[np.ndarray], bool]:
    """tokenize(), through an on-disk cache keyed by tokenizer identity, the truncation and the texts;
    returns the token ids and whether the cache answered."""
    limit = limit if isinstance(limit, Truncation) else Truncation(limit)
    if cache_dir is None:
        return tokenize(tokenizer, texts, limit, progress=progress), False
    h = hash_texts(hashlib.sha256(f"{tokenizer_identity(tokenizer)}|{limit.key()}|{len(texts)}|".encode()), texts)
    ids_path = cache_dir / f"tokens-{h.hexdigest()[:24]}.npy"
    offsets_path = ids_path.with_suffix(".offsets.npy")  # written last: its presence completes the entry
    if offsets_path.is_file():
        try:  # the ids memory-mapped: a row's tokens are read when its batch is built
            flat, offsets = np.load(ids_path, mmap_mode="r", allow_pickle=False), np.load(offsets_path)
            if len(offsets) == len(texts) + 1 and offsets[-1] == len(flat):
                return never_empty([flat[offsets[i]:offsets[i + 1]] for i in range(len(texts))], tokenizer), True
        except (OSError, ValueError):
            pass  # a broken cache entry is rebuilt below
    tokens = tokenize(tokenizer, texts, limit, progress=progress)
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in tokens])
    flat = np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32)
    for path, array in ((ids_path, flat), (offsets_path, offsets)):
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(tokens))], False


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50,
                  max_tokens: int = 0, windows: np.ndarray | None = None) -> list[np.ndarray]:
    """Every row once: shuffle, sort pools of `pool` batches by length, cut into batches, shuffle the batches.
    max_tokens > 0 also caps each batch's padded size (rows × its longest row): long rows come in smaller
    batches. `windows` (each row's, model.chunks > 1): batch_size counts windows, not rows (a row with more
    windows than that is a batch of its own)."""
    perm = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(perm), batch_size * pool):
        chunk = perm[start:start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        if max_tokens <= 0 and windows is None:
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            continue
        begin, load = 0, 0
        for i, row in enumerate(chunk):  # sorted: the row to add is the batch's longest
            size = 1 if windows is None else int(windows[row])
            full = load + size > batch_size or 0 < max_tokens < (i + 1 - begin) * lengths[row]
            if i > begin and full:
                batches.append(chunk[begin:i])
                begin, load = i, 0
            load += size
        batches.append(chunk[begin:])
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(rows: Rows, tcfg: TrainConfig, rng: np.random.Generator, d: Dist = SINGLE,
                  weights: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """One epoch's batches for this rank, each with the factor its mean loss is scaled by (see shard_batches;
    `weights`: each row's weight in the loss, for class-weighted losses); draws from rng."""
    batches = train_batches(rows.lengths, tcfg.batch_size * d.world, rng, max_tokens=tcfg.max_tokens_per_batch * d.world,
                            windows=rows.windows)
    return shard_batches(batches, d, tcfg.grad_accum_steps, weights)


def planned_steps(rows: Rows, tcfg: TrainConfig, rng: np.random.Generator, d: Dist = SINGLE) -> int:
    """The optimizer steps of train.epochs epochs: the epochs' batch lists drawn as training will draw them
    (rng seeded as the loop's), so token budgets and DDP merging are counted exactly."""
    return sum(math.ceil(len(epoch_batches(rows, tcfg, rng, d)) / tcfg.grad_accum_steps) for _ in range(tcfg.epochs))


def inference_batches(lengths: np.ndarray, batch_size: int, d: Dist = SINGLE,
                      windows: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows sorted by length, cut into batches of batch_size rows (or `windows`, model.chunks > 1; the caller
    restores the original order); under DDP only this rank's share, every world-th row of that order."""
    order = shard_rows(np.argsort(lengths, kind="stable"), d)
    if windows is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches, begin, load = [], 0, 0
    for i, row in enumerate(order):
        if i > begin and load + windows[row] > batch_size:
            batches.append(order[begin:i])
            begin, load = i, 0
        load += int(windows[row])
    return batches + ([order[begin:]] if len(order) else [])


def split_windows(tokens: np.ndarray) -> list[np.ndarray]:
    """A row's token ids cut at the WINDOW markers: its windows (one, for a row read in one window)."""
    return [w[w != WINDOW] for w in np.split(tokens, np.flatnonzero(tokens == WINDOW))]


def collate(rows: Rows, index: np.ndarray, pad_id: int, device: torch.device, multiple: int = 1,
            cap: int = 0) -> tuple[torch.Tensor, ...]:
    """Pad the chosen rows to their longest one, rounded up to `multiple` tokens but never past `cap`;
    returns input_ids, attention_mask, meta, and for rows of several windows (model.chunks > 1) the windows
    one per line and owner: the batch row of each window."""
    seqs = [rows.tokens[i] for i in index]
    owner = None
    if any((s == WINDOW).any() for s in seqs):
        parts = [split_windows(s) for s in seqs]
        owner = np.repeat(np.arange(len(seqs)), [len(p) for p in parts])
        seqs = [w for p in parts for w in p]
    width = max(len(s) for s in seqs)
    if multiple > 1:
        width = max(width, min(-(-width // multiple) * multiple, cap))
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
    tensors = [torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(rows.meta[index])]
    if owner is not None:
        tensors.append(torch.from_numpy(owner))
    if device.type == "cuda":  # pinned host memory lets the copy overlap the previous step's kernels
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def batch_maker(rows: Rows, pad_id: int, device: torch.device, packed: bool, multiple: int = 1, cap: int = 0):
    """index -> the batch's tensors: collate()'s padded ones, or (packed) a padding-free packing.Packed in the
    place of input_ids, no attention mask, and the metadata."""
    if not packed:
        return lambda index: collate(rows, index, pad_id, device, multiple, cap)

    def make(index: np.ndarray) -> tuple:
        meta = torch.from_numpy(rows.meta[index])
        meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta.to(device)
        return packing.pack([rows.tokens[i] for i in index], device), None, meta
    return make


PREFETCH_ON = {"cuda"}  # device types whose batches are made ahead: on a CPU the helper thread would take a core


def ahead(make, items, device: torch.device):
    """make(item) for each item, in order. On a GPU the next item's batch is made on a helper thread while the
    caller's step runs: the padding on the host and the pinned, non-blocking copy overlap the device's work."""
    if device.type not in PREFETCH_ON:
        yield from map(make, items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="comp-batches") as pool:
        pending = None
        for item in items:
            upcoming = pool.submit(make, item)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()


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
