"""Where a fold runs and in which precision: the device from train.device, the autocast dtype the hardware
runs natively."""

from __future__ import annotations

import functools

import torch

from comp.config import TrainConfig
from comp.errors import CompError


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


EVAL_ROWS = {"cuda": 128, "cpu": 16}  # train.eval_batch_size = "auto": on a CPU small batches stay in cache


def eval_rows(value: int | str, device: torch.device) -> int:
    """Rows per inference batch: train.eval_batch_size, or for "auto" what runs fastest on this kind of device."""
    return EVAL_ROWS.get(device.type, EVAL_ROWS["cuda"]) if value == "auto" else int(value)


def resolve_precision(tcfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the encoder: train.precision, or for "auto" what the hardware runs natively."""
    if tcfg.precision != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.precision]
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return native_precision(device.type, capability, set(cpu_flags()))


def layer_split(devices: list[str]) -> dict:
    """from_pretrained's keys that place one model's layers over several CUDA devices (a balanced map), its
    weights in the half precision every one of them runs natively: how a notebook's two T4s hold a 9B model
    in fp16. Asking for it without those GPUs is a CompError."""
    named = ",".join(devices)
    if not torch.cuda.is_available() or not all(d.startswith("cuda:") for d in devices):
        raise CompError(f"--device {named} splits a model over CUDA GPUs named cuda:N, and "
                        f"{'no CUDA GPU is visible' if not torch.cuda.is_available() else 'not all of these are'}: "
                        "give one device (--device cpu) or CUDA GPUs (--device cuda:0,cuda:1)")
    index = [torch.device(d).index for d in devices]
    if len(set(index)) < len(index) or max(index) >= torch.cuda.device_count():
        raise CompError(f"--device {named}: name each of the {torch.cuda.device_count()} visible GPUs at most once")
    natives = {native_precision("cuda", torch.cuda.get_device_capability(i), set()) for i in index}
    memory = {i: int(0.9 * torch.cuda.get_device_properties(i).total_memory) for i in index}
    return {"device_map": "balanced", "max_memory": memory,
            "dtype": torch.bfloat16 if natives == {torch.bfloat16} else torch.float16}
