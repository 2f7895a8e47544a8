"""Folds in parallel: one `comp.train --fold k` process per GPU (pinned with CUDA_VISIBLE_DEVICES) or per CPU job."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rich.console import Console

from comp import metrics
from comp.artifacts import read_json
from comp.config import Config


@dataclass
class Slot:
    """Where one fold process runs: a GPU id, or a share of the CPU cores."""

    name: str
    env: dict


def make_slots(devices: list[str] | None, jobs: int) -> list[Slot]:
    """One slot per listed GPU, else `jobs` CPU slots that split the cores between them."""
    if devices:
        return [Slot(f"cuda device {d}", {"CUDA_VISIBLE_DEVICES": d}) for d in devices]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = str(max(1, cores // jobs))  # the cores this process may use (taskset, a container's share)
    return [Slot(f"cpu job {i}", {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""})
            for i in range(jobs)]


def child_argv(args, fold: int) -> list[str]:
    """The comp.train command line of one fold: the parent's config, overrides and params."""
    argv = [sys.executable, "-m", "comp.train", "--config", str(args.config), "--fold", str(fold), "--quiet"]
    for item in args.set:
        argv += ["--set", item]
    if args.params:
        argv += ["--params", str(args.params)]
    if args.force:
        argv.append("--force")
    return argv


def run_folds(cfg: Config, args, folds: list[int], slots: list[Slot], console: Console) -> list[int]:
    """Train the folds, at most one per slot at a time; returns the folds whose process failed."""
    queue, running, failed = list(folds), {}, []
    free = list(slots)
    try:
        while queue or running:
            while queue and free:
                fold, slot = queue.pop(0), free.pop(0)
                err = tempfile.TemporaryFile()
                proc = subprocess.Popen(child_argv(args, fold), env={**os.environ, **slot.env},
                                        stdout=subprocess.DEVNULL, stderr=err)
                running[fold] = (proc, slot, err, time.perf_counter())
                console.print(f"fold {fold} started on {slot.name} (pid {proc.pid})")
            time.sleep(0.2)
            for fold, (proc, slot, err, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[fold]
                free.append(slot)
                seconds = time.perf_counter() - started
                if proc.returncode == 0:
                    best = read_json(cfg.fold_dir(fold) / "metrics.json")["best"]
                    console.print(f"fold {fold} done on {slot.name} in {seconds:.0f}s: {metrics.row_line(best)}")
                else:
                    err.seek(0)
                    lines = err.read().decode("utf-8", "replace").strip().splitlines()
                    console.print(f"fold {fold} failed on {slot.name} (exit {proc.returncode}): "
                                  f"{lines[-1] if lines else 'no message'}")
                    failed.append(fold)
                err.close()
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            proc.terminate()
        raise
    return failed
