"""`python -m comp.bench`: comp's training loop against the seed notebook's loop and Hugging Face Trainer,
on the same device, model and rows, in one process."""

from __future__ import annotations

import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, Dataset

from comp import __version__, cli, metrics
from comp.artifacts import write_json
from comp.config import Config, resolve_model_path
from comp.errors import CompError, run_cli
from comp.nn.batching import Rows, Truncation, tokenize, train_batches
from comp.nn.distributed import SINGLE, shard_batches
from comp.nn.hardware import eval_rows, resolve_device, resolve_precision
from comp.nn.loop import Runtime, make_progress, predict, train_one_epoch
from comp.nn.model import build_model, encoder_config, hold_for_inference, load_encoder, load_tokenizer, pad_id
from comp.nn.state import TrainState, make_optimizer, seed_everything
from comp.outputs.runs import Tokens, fit_split
from comp.tables.features import MetaEncoder
from comp.tables.read import load_competition

# --- measurement helpers ---------------------------------------------------------------------------

def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of large square matmuls in dtype (the device's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10:
            continue
        _sync(device)
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak resident memory (and peak CUDA memory) of a phase; resets the kernel's high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.rss_mb = _vm_hwm_mb()
        self.cuda_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None


def _vm_hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(device: torch.device, work) -> tuple[float, PeakMemory]:
    """Seconds and peak memory of work()."""
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        work()
        _sync(device)
        seconds = time.perf_counter() - t0
    return seconds, mem


def median_round(runs: list[dict]) -> dict:
    """The median of several timed rounds (_speed dicts), with the highest memory and every round's samples/s."""
    ranked = sorted(runs, key=lambda t: t["samples_per_s"])
    return {**ranked[len(ranked) // 2], "peak_rss_mb": max(t["peak_rss_mb"] for t in runs),
            "rounds_samples_per_s": [round(t["samples_per_s"], 2) for t in runs]}


def flop_params(encoder: nn.Module) -> int:
    """Encoder parameters without the embedding tables (the ones every token multiplies through)."""
    return sum(p.numel() for name, p in encoder.named_parameters() if "embeddings" not in name)


# --- (a) the seed notebook's loop, faithfully -------------------------------------------------------

class SeedDataset(Dataset):
    """As in the seed: every item tokenized again on every access, padded to 512; metadata encoded per item.
    pad_to_pair: the items are not padded and each batch of two is padded to its longer row instead (the
    quality check: the same updates, since padding never changes an output, several times sooner)."""

    def __init__(self, texts, frame, encoder, labels, tokenizer, max_length=512, pad_to_pair=False):
        self.texts, self.frame, self.encoder, self.labels = texts, frame, encoder, labels
        self.tokenizer, self.max_length, self.pad_to_pair = tokenizer, max_length, pad_to_pair

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        token = self.tokenizer(self.texts[i], add_special_tokens=True, max_length=self.max_length, truncation=True,
                               padding=False if self.pad_to_pair else "max_length", return_tensors="pt")
        item = {"input_ids": token["input_ids"][0], "attention_mask": token["attention_mask"][0],
                "meta": torch.from_numpy(self.encoder.transform(self.frame.iloc[[i]])[0])}
        return item, int(self.labels[i])

    def loader(self, **kwargs) -> DataLoader:
        return DataLoader(self, batch_size=2, collate_fn=self.collate if self.pad_to_pair else None, **kwargs)

    def collate(self, items):
        data, labels = zip(*items, strict=True)
        padded = self.tokenizer.pad([{k: d[k] for k in ("input_ids", "attention_mask")} for d in data],
                                    return_tensors="pt")
        return {**padded, "meta": torch.stack([d["meta"] for d in data])}, torch.tensor(labels)


class SeedModel(nn.Module):
    """The seed's BertClassificationModel: [CLS] ⊕ metadata → Dropout → 512 → ReLU → 64 → ReLU → classes."""

    def __init__(self, encoder, n_meta, n_classes):
        super().__init__()
        self.bert = encoder
        self.net = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(encoder.config.hidden_size + n_meta, 512),
                                 nn.ReLU(inplace=True), nn.Linear(512, 64), nn.ReLU(inplace=True))
        self.out = nn.Linear(64, n_classes)

    def forward(self, batch, device):
        out = self.bert(input_ids=batch["input_ids"].clone().detach().to(device),
                        attention_mask=batch["attention_mask"].clone().detach().to(device))
        cat = torch.cat((out[0][:, 0, :], batch["meta"].clone().detach().to(device)), 1)
        return self.out(self.net(cat.to(torch.float32)))


def seed_optimizer(model: SeedModel):
    bert = [p for n, p in model.named_parameters() if "bert" in n]
    head = [p for n, p in model.named_parameters() if "bert" not in n]
    return torch.optim.Adam([{"params": bert, "lr": 1e-5}, {"params": head, "lr": 1e-4}], eps=1e-7, weight_decay=0.001)


def seed_epoch(model, dataset, optimizer, device, generator) -> tuple[int, int]:
    """One epoch of the seed's loop; returns (samples, useful tokens)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    samples = tokens = 0
    for data, label in dataset.loader(shuffle=True, num_workers=0, generator=generator):
        optimizer.zero_grad()
        output = model(data, device)
        loss = criterion(output, label.to(device))
        loss.backward()
        optimizer.step()
        loss.item()
        samples += len(label)
        tokens += int(data["attention_mask"].sum())
        del data, label, output
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return samples, tokens


@torch.no_grad()
def seed_predict(model, dataset, device) -> tuple[np.ndarray, float]:
    model.eval()
    logits = [model(data, device).float().cpu() for data, _ in dataset.loader()]
    out = torch.cat(logits).numpy()
    return out, metrics.score(np.asarray(dataset.labels), out)["log_loss"]


def comp_training_state(cfg: Config, n_meta: int, n_classes: int, device: torch.device, amp: torch.dtype | None,
                        pad: int) -> tuple[TrainState, Runtime]:
    """comp's model as a fold builds it, its optimizer at a constant learning rate, and the loop's runtime: what
    the benches time comp's training with."""
    model = build_model(cfg.model, n_meta, n_classes, root=cfg.root, tcfg=cfg.train).to(device)
    opt = make_optimizer(model, cfg.train)
    state = TrainState.bare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    return state, Runtime(cfg.train, device, amp, pad, nn.CrossEntropyLoss())


# --- (c) Hugging Face Trainer ----------------------------------------------------------------------

def trainer_for(path, tokenizer, n_classes, rows, bs, amp, device, lr, out_dir, epochs=1, max_steps=-1,
                eval_rows=None, patience=None, mcfg=None, seed=0, collator=None, attention=None):
    """A text-only Trainer with dynamic padding and length-grouped sampling, on the same encoder config
    (the [model] overrides) as comp; `collator` and `attention` (an attn_implementation) replace the padding
    collator and the default attention."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        TrainingArguments,
    )

    config = encoder_config(mcfg, path) if mcfg else AutoConfig.from_pretrained(path)
    config.num_labels = n_classes
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, **({"attn_implementation": attention} if attention else {}))
    quality = eval_rows is not None
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=bs, per_device_eval_batch_size=128,
        bf16=amp == torch.bfloat16, fp16=amp == torch.float16, train_sampling_strategy="group_by_length",
        num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr, warmup_steps=0.1, weight_decay=0.01,
        report_to=[], disable_tqdm=True, logging_strategy="no", use_cpu=device.type == "cpu",
        dataloader_num_workers=0, seed=seed, eval_strategy="epoch" if quality else "no",
        save_strategy="epoch" if quality else "no", load_best_model_at_end=quality,
        metric_for_best_model="eval_loss" if quality else None, greater_is_better=False if quality else None,
        save_total_limit=2 if quality else None)
    callbacks = [EarlyStoppingCallback(early_stopping_patience=patience)] if quality else []
    return Trainer(model=model, args=args, train_dataset=rows, eval_dataset=eval_rows,
                   data_collator=collator or DataCollatorWithPadding(tokenizer), callbacks=callbacks)


def hf_rows(tokens, labels):
    return [{"input_ids": t.tolist(), "attention_mask": [1] * len(t), "labels": int(y)}
            for t, y in zip(tokens, labels, strict=True)]


# --- the benchmark ---------------------------------------------------------------------------------

def run_bench(cfg: Config, n_samples: int, quality_rows: int, quality_epochs: int, console: Console,
              skip_quality: bool = False, quality_patience: int = 2, rounds: int = 3, quality_seeds: int = 1) -> dict:
    """Speed of (a) the seed loop, (b) comp, (c) Trainer on the same rows; matmul peaks; quality to early stop."""
    device = resolve_device(cfg.train)
    amp = resolve_precision(cfg.train, device)
    comp = load_competition(cfg, with_test=False)
    order = np.random.default_rng(0).permutation(len(comp.train))
    need = n_samples + (0 if skip_quality else 2 * quality_rows)
    if len(order) < need:
        raise CompError(f"the bench needs {need} training rows, the config gives {len(order)}; "
                        "lower --samples / --quality-rows or raise data.train_rows")
    speed_idx = order[:n_samples]
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    path = resolve_model_path(cfg.model.name_or_path, cfg.root)
    n_classes = len(comp.classes)
    tokens = tokenize(tokenizer, comp.train_text, Truncation.of(cfg.model))
    result = {"machine": {"platform": platform.platform(), "processor": _cpu_name(), "device": str(device),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "comp": __version__},
              "model": cfg.model.name_or_path, "precision": str(amp).replace("torch.", "") if amp else "fp32",
              "batch_size": cfg.train.batch_size, "samples": n_samples,
              "attention_dropout": "encoder default" if cfg.model.attention_dropout is None else cfg.model.attention_dropout}

    console.print("matmul peaks ...")
    result["matmul_tflops"] = {"fp32": matmul_peak(device, torch.float32) / 1e12,
                               "bf16": matmul_peak(device, torch.bfloat16) / 1e12}
    encoder = load_encoder(cfg.model, root=cfg.root)
    result["encoder_flop_params"] = flop_params(encoder)
    seed_len = min(512, getattr(encoder.config, "max_position_embeddings", 512))  # the seed pads to 512
    result["seed_padding"] = seed_len
    del encoder

    def meta_for(idx):
        enc = MetaEncoder.from_config(cfg).fit(comp.train.iloc[idx])
        return enc, enc.transform(comp.train.iloc[idx])

    # (a) the seed's loop
    console.print(f"(a) seed loop on {n_samples} samples ...")
    enc, _ = meta_for(speed_idx)
    seed_everything(0)
    seed_model = SeedModel(load_encoder(cfg.model, root=cfg.root), enc.width, n_classes).to(device)
    opt = seed_optimizer(seed_model)
    texts = [comp.train_text[i] for i in speed_idx]
    frame = comp.train.iloc[speed_idx].reset_index(drop=True)
    warm = SeedDataset(texts[:4], frame.iloc[:4], enc, comp.y[speed_idx[:4]], tokenizer, seed_len)
    seed_epoch(seed_model, warm, opt, device, torch.Generator().manual_seed(0))
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        s, tok = seed_epoch(seed_model, SeedDataset(texts, frame, enc, comp.y[speed_idx], tokenizer, seed_len), opt, device,
                            torch.Generator().manual_seed(0))
        _sync(device)
        dt = time.perf_counter() - t0
    result["seed_loop"] = _speed(s, tok, dt, mem)
    del seed_model, opt
    gc.collect()

    # (b) comp's engine, its defaults; (c) Trainer. Both are short, so they are timed `rounds` times,
    # interleaved, and the median round is kept (this VM's short timings vary by ±10% run to run).
    console.print(f"(b) comp and (c) Trainer on {n_samples} samples, {rounds} rounds each ...")
    enc, meta = meta_for(speed_idx)
    rows = Rows([tokens[i] for i in speed_idx], meta, comp.y[speed_idx])
    seed_everything(0)
    state, rt = comp_training_state(cfg, enc.width, n_classes, device, amp, pad_id(tokenizer))

    def shares(batches):
        return shard_batches(batches, SINGLE, cfg.train.grad_accum_steps)
    hf = hf_rows([tokens[i] for i in speed_idx], comp.y[speed_idx])
    useful = int(rows.lengths.sum())  # the same rows, so the same useful tokens, for (b) and (c)
    timings: dict[str, list] = {"comp": [], "trainer": []}
    with make_progress(Console(quiet=True)) as progress, tempfile.TemporaryDirectory() as tmp:
        warm_batches = train_batches(rows.lengths, cfg.train.batch_size, np.random.default_rng(1))[:2]
        train_one_epoch(state, rows, shares(warm_batches), rt, progress)
        trainer_for(path, tokenizer, n_classes, hf[:cfg.train.batch_size * 2], cfg.train.batch_size, amp, device,
                    cfg.train.encoder_lr, Path(tmp) / "warm", max_steps=2, mcfg=cfg.model).train()
        for r in range(rounds):
            batches = train_batches(rows.lengths, cfg.train.batch_size, np.random.default_rng(r))
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                train_one_epoch(state, rows, shares(batches), rt, progress)
                _sync(device)
                dt = time.perf_counter() - t0
            timings["comp"].append(_speed(n_samples, useful, dt, mem))
            trainer = trainer_for(path, tokenizer, n_classes, hf, cfg.train.batch_size, amp, device,
                                  cfg.train.encoder_lr, Path(tmp) / f"speed{r}", mcfg=cfg.model)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                trainer.train()
                _sync(device)
                dt = time.perf_counter() - t0
            del trainer
            gc.collect()
            timings["trainer"].append(_speed(n_samples, useful, dt, mem))
    del state
    gc.collect()
    for key, runs in timings.items():
        result[key] = median_round(runs)

    b, a, c = result["comp"], result["seed_loop"], result["trainer"]
    peak = result["matmul_tflops"]["bf16" if amp == torch.bfloat16 else "fp32"] * 1e12
    result["ratios"] = {"comp_over_seed": b["samples_per_s"] / a["samples_per_s"],
                        "comp_over_trainer": b["samples_per_s"] / c["samples_per_s"]}
    result["comp_mfu"] = 6 * result["encoder_flop_params"] * b["useful_tokens_per_s"] / peak
    result["trainer_mfu"] = 6 * result["encoder_flop_params"] * c["useful_tokens_per_s"] / peak
    if not skip_quality:
        result["quality"] = quality(cfg, comp, tokens, order[n_samples:n_samples + 2 * quality_rows], quality_epochs,
                                    tokenizer, path, device, amp, console, seed_len, quality_patience,
                                    quality_seeds)
    return result


def quality(cfg, comp, tokens, idx, epochs, tokenizer, path, device, amp, console, seed_len=512, patience=2,
            seeds: int = 1, first_seed: int = 0) -> dict:
    """Validation macro-F1 of (a), (b), (c) trained on the same rows to early stopping on the validation loss
    (at most `epochs`, stopping after `patience` epochs without a gain; each keeps its best epoch's model),
    each with `seeds` training seeds from `first_seed` on; macro_f1 is the mean over the seeds."""
    half = len(idx) // 2
    tr, va = idx[:half], idx[half:]
    n_classes = len(comp.classes)
    enc = MetaEncoder.from_config(cfg).fit(comp.train.iloc[tr])
    out = {"train_rows": len(tr), "val_rows": len(va), "max_epochs": epochs, "patience": patience, "seeds": seeds,
           "seed_loop_padding": "each pair to its longer row (the speed run pads to 512)"}
    frame_tr, frame_va = comp.train.iloc[tr].reset_index(drop=True), comp.train.iloc[va].reset_index(drop=True)
    ds_tr = SeedDataset([comp.train_text[i] for i in tr], frame_tr, enc, comp.y[tr], tokenizer, seed_len, True)
    ds_va = SeedDataset([comp.train_text[i] for i in va], frame_va, enc, comp.y[va], tokenizer, seed_len, True)
    runs: dict[str, list] = {"seed_loop": [], "comp": [], "trainer": []}

    for seed in range(first_seed, first_seed + seeds):
        console.print(f"quality (a) seed loop, seed {seed}: {len(tr)} rows, up to {epochs} epochs ...")
        t0 = time.perf_counter()
        seed_everything(seed)
        model = SeedModel(load_encoder(cfg.model, root=cfg.root), enc.width, n_classes).to(device)
        opt = seed_optimizer(model)
        best, best_logits, run, waited = None, None, 0, 0
        while run < epochs and waited < patience:
            seed_epoch(model, ds_tr, opt, device, torch.Generator().manual_seed(run + 1000 * seed))
            run += 1
            logits, loss = seed_predict(model, ds_va, device)
            if best is None or loss < best:
                best, best_logits, waited = loss, logits, 0
            else:
                waited += 1
        runs["seed_loop"].append((metrics.score(comp.y[va], best_logits)["macro_f1"], run, time.perf_counter() - t0))
        del model, opt

        console.print(f"quality (b) comp, seed {seed} ...")
        t0 = time.perf_counter()
        qcfg = cfg.replace("train", epochs=epochs, patience=patience, monitor="val_loss", checkpoint_every=0,
                           seed=cfg.train.seed + seed)
        _, res = fit_split(qcfg, comp, (tr, va), 0, Tokens(tokens, None, pad_id(tokenizer)), Console(quiet=True))
        runs["comp"].append((metrics.score(comp.y[va], res.val_logits)["macro_f1"], len(res.history),
                             time.perf_counter() - t0))
        del res

        console.print(f"quality (c) Trainer, seed {seed} ...")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(path, tokenizer, n_classes, hf_rows([tokens[i] for i in tr], comp.y[tr]),
                                  cfg.train.batch_size, amp, device, cfg.train.encoder_lr, Path(tmp), epochs=epochs,
                                  eval_rows=hf_rows([tokens[i] for i in va], comp.y[va]), patience=patience,
                                  mcfg=cfg.model, seed=seed)
            trainer.train()
            logits = trainer.predict(hf_rows([tokens[i] for i in va], comp.y[va])).predictions
            epochs_run = int(round(trainer.state.epoch or 0))
            del trainer
        runs["trainer"].append((metrics.score(comp.y[va], np.asarray(logits, dtype=np.float32))["macro_f1"],
                                epochs_run, time.perf_counter() - t0))
        gc.collect()
    for key, rs in runs.items():
        out[key] = {"macro_f1": float(np.mean([r[0] for r in rs])), "per_seed": [r[0] for r in rs],
                    "epochs": [r[1] for r in rs], "seconds": round(sum(r[2] for r in rs), 1)}
    return out


# --- inference: comp.predict's loop against a plain Hugging Face loop and the pipeline -------------------

def inference_bench(cfg: Config, n_rows: int, console: Console, rounds: int = 3) -> dict:
    """Rows/s, useful tokens/s and peak RSS of prediction on the same test rows and device: (b) comp's
    predict (length-sorted batches, the config's precision and eval batch), (p) a plain Hugging Face loop
    (AutoModelForSequenceClassification, DataCollatorWithPadding, batch 128, table order) and (q)
    transformers.pipeline("text-classification", batch 128), each the median of `rounds` passes; comp's share
    of the matmul peak of its precision at 2 × encoder parameters without embeddings per useful token."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, pipeline

    device = resolve_device(cfg.train)
    amp = resolve_precision(cfg.train, device)
    comp = load_competition(cfg)
    texts = comp.test_text[:n_rows]
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    path = resolve_model_path(cfg.model.name_or_path, cfg.root)
    tokens = tokenize(tokenizer, texts, Truncation.of(cfg.model))
    useful = int(sum(len(t) for t in tokens))
    enc = MetaEncoder.from_config(cfg).fit(comp.train)
    rows = Rows(tokens, enc.transform(comp.test.iloc[:n_rows]))
    out: dict = {"rows": len(texts), "useful_tokens": useful, "batch_size": eval_rows(cfg.train.eval_batch_size, device),
                 "precision": str(amp).replace("torch.", "") if amp else "fp32", "rounds": rounds}

    def speed(work) -> dict:
        return median_round([_speed(len(texts), useful, *timed(device, work)) for _ in range(rounds)])
    model = build_model(cfg.model, enc.width, len(comp.classes), root=cfg.root, tcfg=cfg.train).to(device).eval()
    hold_for_inference(model, amp)  # as comp.predict loads a fold
    batch = cfg.train.eval_batch_size
    predict(model, Rows(tokens[:8], rows.meta[:8]), batch, pad_id(tokenizer), device, amp)  # warm-up
    out["comp"] = speed(lambda: predict(model, rows, batch, pad_id(tokenizer), device, amp))
    out["encoder_flop_params"] = flop_params(model.encoder)
    model = None  # its memory back before the plain model loads

    plain = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(comp.classes)).to(device).eval()
    collator = DataCollatorWithPadding(tokenizer)

    @torch.inference_mode()
    def plain_loop():
        for start in range(0, len(texts), 128):
            enc_batch = tokenizer(texts[start:start + 128], truncation=True, max_length=cfg.model.max_length)
            batch = collator([{k: enc_batch[k][i] for k in enc_batch} for i in range(len(enc_batch["input_ids"]))])
            plain(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    out["plain_loop"] = speed(plain_loop)
    classify = pipeline("text-classification", model=plain, tokenizer=tokenizer, device=device)
    out["pipeline"] = speed(lambda: classify(texts, batch_size=128, truncation=True, max_length=cfg.model.max_length))
    peak = matmul_peak(device, amp or torch.float32)
    out["matmul_peak_tflops"] = peak / 1e12
    out["comp_mfu"] = 2 * out["encoder_flop_params"] * out["comp"]["useful_tokens_per_s"] / peak
    out["comp_over_plain"] = out["comp"]["samples_per_s"] / out["plain_loop"]["samples_per_s"]
    out["comp_over_pipeline"] = out["comp"]["samples_per_s"] / out["pipeline"]["samples_per_s"]
    return out


def print_inference(r: dict, console: Console) -> None:
    table = Table(title=f"inference: {r['rows']} test rows, {r['precision']} and batch {r['batch_size']} for comp, "
                        "batch 128 for the others")
    for col in ("loop", "rows/s", "useful tokens/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for key, name in (("comp", "(b) comp.predict"), ("plain_loop", "(p) plain HF loop"), ("pipeline", "(q) pipeline")):
        s = r[key]
        table.add_row(name, f"{s['samples_per_s']:.1f}", f"{s['useful_tokens_per_s']:.0f}", str(s["peak_rss_mb"]))
    console.print(table)
    console.print(f"comp / plain loop {r['comp_over_plain']:.2f}x, comp / pipeline {r['comp_over_pipeline']:.2f}x; "
                  f"comp's share of the matmul peak {r['comp_mfu']:.0%}")


def _speed(samples: int, tokens: int, seconds: float, mem: PeakMemory) -> dict:
    d = {"samples_per_s": samples / seconds, "useful_tokens_per_s": tokens / seconds, "seconds": round(seconds, 2),
         "peak_rss_mb": round(mem.rss_mb)}
    if mem.cuda_mb is not None:
        d["peak_cuda_mb"] = round(mem.cuda_mb)
    return d


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_result(r: dict, console: Console) -> None:
    table = Table(title=f"training speed: {r['model']}, {r['precision']}, batch {r['batch_size']}, "
                        f"{r['samples']} samples on {r['machine']['device']} ({r['machine']['processor']})")
    for col in ("loop", "samples/s", "useful tokens/s", "peak RSS MB", "macro-F1 (quality)"):
        table.add_column(col, justify="right")
    q = r.get("quality", {})
    for key, name in (("seed_loop", "(a) seed loop"), ("comp", "(b) comp"), ("trainer", "(c) HF Trainer")):
        s = r[key]
        f1 = f"{q[key]['macro_f1']:.4f} ({'/'.join(map(str, q[key]['epochs']))} ep)" if key in q else ""
        table.add_row(name, f"{s['samples_per_s']:.1f}", f"{s['useful_tokens_per_s']:.0f}", str(s["peak_rss_mb"]), f1)
    console.print(table)
    t = r["matmul_tflops"]
    console.print(f"matmul peak: fp32 {t['fp32'] * 1000:.0f} GFLOP/s, bf16 {t['bf16'] * 1000:.0f} GFLOP/s; "
                  f"comp / seed {r['ratios']['comp_over_seed']:.1f}x, comp / Trainer "
                  f"{r['ratios']['comp_over_trainer']:.2f}x; comp MFU {r['comp_mfu']:.0%} "
                  f"(Trainer {r['trainer_mfu']:.0%})")


def main(argv: list[str] | None = None) -> int:
    """Benchmark comp's training loop against the seed notebook's loop and Hugging Face Trainer."""
    parser = cli.parser("comp.bench", main.__doc__)
    parser.add_argument("--samples", type=int, default=256, help="training samples each loop is timed on")
    parser.add_argument("--quality-rows", type=int, default=400, help="train rows (and as many val rows) for the "
                                                                      "quality check")
    parser.add_argument("--quality-epochs", type=int, default=10, help="most epochs of the quality check")
    parser.add_argument("--quality-seeds", type=int, default=1, help="training seeds per loop in the quality check "
                                                                       "(macro-F1 is their mean)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of comp and Trainer (the median is kept)")
    parser.add_argument("--quality-patience", type=int, default=2, help="epochs without a validation-loss gain "
                                                                          "that end a quality run")
    parser.add_argument("--skip-quality", action="store_true", help="only measure speed")
    parser.add_argument("--inference-rows", type=int, default=512, help="test rows the inference loops are timed on")
    parser.add_argument("--inference-only", action="store_true", help="only the inference comparison")
    parser.add_argument("--out", default="reports/bench.json", help="where the JSON goes")
    args = parser.parse_args(argv)

    def body() -> int:
        for flag in ("samples", "quality_rows", "quality_epochs", "quality_patience", "rounds", "quality_seeds",
                     "inference_rows"):
            if getattr(args, flag) < 1:
                raise CompError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
        console = cli.console(args.quiet)
        cfg = cli.load_config(args)
        result = {}
        if not args.inference_only:
            result = run_bench(cfg, args.samples, args.quality_rows, args.quality_epochs, console, args.skip_quality,
                               args.quality_patience, args.rounds, args.quality_seeds)
            print_result(result, console)
        console.print("inference ...")
        result["inference"] = inference_bench(cfg, args.inference_rows, console, args.rounds)
        print_inference(result["inference"], console)
        write_json(Path(args.out), result)
        console.print(f"wrote {args.out}")
        console.print(json.dumps(result, indent=1, default=str), highlight=False)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
