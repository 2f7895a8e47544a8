"""One fold on several processes: PyTorch's DistributedDataParallel under `torchrun` (NCCL on GPUs, gloo on CPU).

Every rank builds the same global batch order from the same seed and trains on its share of each global
batch; validation and test rows are split between the ranks and their logits gathered back, so every rank
sees the same metrics and takes the same early-stopping decision. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from comp.errors import CompError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the single-process default is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """The sums of these numbers over every rank (the numbers themselves with one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def from_env() -> Dist:
    """The job torchrun started this process in (WORLD_SIZE / RANK / LOCAL_RANK), joined; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and os.environ.get("COMP_DIST_BACKEND", "") != "gloo"
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise CompError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                                "start torchrun with --nproc-per-node at most the number of GPUs")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def close(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(batches: list[np.ndarray], d: Dist, accum: int = 1,
                  weights: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """This rank's part of each global batch, with the factor its (weighted) mean loss is scaled by so that
    the gradient summed over an accumulation group of `accum` batches (and averaged over ranks by DDP) is
    the weighted mean over every row of the group: the part's weight × world / the group's weight. A row's
    weight is its class weight in a weighted loss (`weights`, indexed by row), else 1, so a trailing partial
    group, batches of unequal size (token budgets) and parts of unequal class mix all count exactly. The
    part is rows rank, rank+world, ... of the (length-sorted) batch: every rank gets rows of about the
    same length, every row goes to exactly one rank. A global batch with fewer rows than ranks is merged
    into its neighbour, so no rank ever has an empty step."""
    world, rank = (d.world, d.rank) if d.enabled else (1, 0)
    merged: list[np.ndarray] = []
    for b in batches:
        if len(b) < world and merged:
            merged[-1] = np.concatenate([merged[-1], b])
        else:
            merged.append(b)
    if len(merged) > 1 and len(merged[0]) < world:
        merged[1] = np.concatenate([merged[0], merged[1]])
        merged.pop(0)
    if merged and len(merged[0]) < world:
        raise CompError(f"a fold's training part has {len(merged[0])} rows, fewer than the {world} processes "
                        "torchrun started: use fewer processes")

    def weight(index: np.ndarray) -> float:
        return float(len(index)) if weights is None else float(weights[index].sum())

    out = []
    for start in range(0, len(merged), accum):
        group = merged[start:start + accum]
        total = sum(weight(b) for b in group)
        out += [(b[rank::world], weight(b[rank::world]) * world / total) for b in group]
    return out


def shard_rows(order: np.ndarray, d: Dist) -> np.ndarray:
    """This rank's rows for inference: every world-th row of the length-sorted order."""
    return order[d.rank::d.world] if d.enabled else order
