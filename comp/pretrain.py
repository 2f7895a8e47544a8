"""`python -m comp.pretrain`: domain-adaptive pretraining. Continues the masked-language-model training of
model.name_or_path on the competition's own texts (the train and test tables, or the table pretrain.texts
names), then writes a model folder (pretrain.out) that model.name_or_path can point at. Texts are read as the
encoder will read them (model.max_length, truncation, chunks: each window is a text). A share of the texts is
held out and its MLM accuracy measured before and after. Resumes from its checkpoint after a kill."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from transformers import DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

from comp import cli
from comp.artifacts import read_json, write_json
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.nn.batching import (
    Truncation,
    cached_tokenize,
    hash_texts,
    inference_batches,
    split_windows,
    tokenizer_identity,
    train_batches,
)
from comp.nn.hardware import resolve_device, resolve_precision
from comp.nn.loop import make_progress
from comp.nn.model import load_masked_lm, load_tokenizer
from comp.nn.state import Checkpoint, seed_everything
from comp.tables.read import load_competition, load_texts

RECORD = "pretrain.json"


def corpus(cfg: Config) -> list[str]:
    """The texts to pretrain on: pretrain.texts's table (data.text's columns), else the train and test tables."""
    if not cfg.pretrain.texts:
        comp = load_competition(cfg)
        return comp.train_text + comp.test_text
    return load_texts(cfg, cfg.path(cfg.pretrain.texts), "pretrain.texts")


def sequences(cfg: Config, tokenizer, texts: list[str], console: Console) -> list[np.ndarray]:
    """The texts' token ids as the encoder reads them (through the token cache); each window of a chunked text
    is a sequence of its own."""
    with make_progress(console) as progress:
        tokens, _ = cached_tokenize(tokenizer, texts, Truncation.of(cfg.model), cfg.cache_dir, progress)
    return [w for t in tokens for w in split_windows(t) if len(w)]


def fingerprint(cfg: Config, tokenizer, texts: list[str]) -> str:
    """What a checkpoint and a finished folder belong to: the source model and its tokenizer, how texts are cut,
    the settings and the texts."""
    settings = {k: v for k, v in cfg.to_dict()["pretrain"].items() if k != "out"}
    h = hashlib.sha256(json.dumps([cfg.model.name_or_path, tokenizer_identity(tokenizer), Truncation.of(cfg.model).key(),
                                   settings, cfg.train.weight_decay, cfg.train.grad_clip], sort_keys=True).encode())
    return hash_texts(h, texts).hexdigest()[:16]


def batch(tokens: list[np.ndarray], index: np.ndarray, collator, device: torch.device) -> dict:
    """Masked, padded inputs and labels (-100 where a token is not masked) for the sequences at `index`."""
    features = collator([{"input_ids": tokens[i].tolist()} for i in index])
    return {k: v.to(device) for k, v in features.items() if k in ("input_ids", "attention_mask", "labels")}


@torch.inference_mode()
def mlm_accuracy(model, tokens: list[np.ndarray], tokenizer, cfg: Config, device, amp) -> dict:
    """Accuracy and mean loss at the masked tokens of `tokens`, masked the same way on every call."""
    model.eval()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.pretrain.mask_probability,
                                               seed=cfg.pretrain.seed)
    lengths = np.array([len(t) for t in tokens])
    right = total = 0
    loss_sum = 0.0
    for index in inference_batches(lengths, cfg.pretrain.batch_size):  # logits are batch x length x vocabulary
        inputs = batch(tokens, index, collator, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        at = inputs["labels"] != -100
        masked, labels = logits[at].float(), inputs["labels"][at]
        right += int((masked.argmax(-1) == labels).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(masked, labels, reduction="sum"))
        total += int(at.sum())
    return {"accuracy": right / max(total, 1), "loss": loss_sum / max(total, 1), "masked_tokens": total}


def pretrain(cfg: Config, console: Console, force: bool = False) -> dict:
    """Continue masked-LM training on the competition's texts; write the model folder and its record."""
    started = time.perf_counter()
    pcfg, out = cfg.pretrain, cfg.pretrained_dir
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise CompError(f"the tokenizer of {cfg.model.name_or_path!r} has no mask or padding token: masked-LM "
                        "pretraining needs both; pick another model")
    texts = corpus(cfg)
    key = fingerprint(cfg, tokenizer, texts)
    finished = finished_record(out, key, force)
    if finished is not None:
        console.print(f"{out} already holds this pretraining (same model, settings and texts); --force redoes it")
        return finished
    tokens = sequences(cfg, tokenizer, texts, console)
    if len(tokens) < 2:
        raise CompError("pretrain: fewer than 2 texts to train on; give more rows or pretrain.texts")
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(pcfg.seed).permutation(len(tokens))
    n_eval = min(pcfg.eval_texts, max(1, len(tokens) // 10))
    held, train = [tokens[i] for i in order[:n_eval]], [tokens[i] for i in order[n_eval:]]
    console.print(f"pretrain {cfg.model.name_or_path}: {len(texts)} texts ({len(train)} sequences to train on, "
                  f"{n_eval} held out), {pcfg.epochs} epoch(s) of {math.ceil(len(train) / pcfg.batch_size)} steps")
    record = fit(cfg, tokenizer, train, held, work, key, console)
    record.update(model=cfg.model.name_or_path, texts=len(texts), fingerprint=key,
                  seconds=round(time.perf_counter() - started, 1), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(work / RECORD, record)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    b, a = record["before"], record["after"]
    console.print(f"MLM accuracy on {n_eval} held-out texts ({a['masked_tokens']} masked tokens): "
                  f"{b['accuracy']:.3f} -> {a['accuracy']:.3f} (loss {b['loss']:.3f} -> {a['loss']:.3f})")
    where = os.path.relpath(out, cfg.root).replace(os.sep, "/")
    console.print(f"pretraining took {record['seconds']:.0f}s; wrote {out}: set model.name_or_path = \"{where}\" "
                  "(and a new run.name) to fine-tune from it")
    return record


def finished_record(out: Path, key: str, force: bool) -> dict | None:
    """The record in `out` when it holds this very pretraining (and --force was not given); None when `out` is
    free to write (absent, or --force); a CompError when it holds anything else."""
    if not out.exists() or force:
        return None
    done = out / RECORD
    if done.is_file() and read_json(done).get("fingerprint") == key:
        return read_json(done)
    raise CompError(f"pretrain.out {out} exists and holds something else: pass --force to replace it, or set "
                    "pretrain.out to another folder")


def fit(cfg: Config, tokenizer, train: list[np.ndarray], held: list[np.ndarray], work: Path, key: str,
        console: Console) -> dict:
    """The masked-LM epochs over `train`, resuming from work/last.pt when it belongs to `key`; saves the model
    and tokenizer into `work`; returns the record (accuracy on `held` before and after, steps, resume point)."""
    pcfg = cfg.pretrain
    device = resolve_device(cfg.train)
    amp = resolve_precision(cfg.train, device)
    seed_everything(pcfg.seed)
    model = load_masked_lm(cfg.model, cfg.root).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=cfg.train.weight_decay)
    lengths = np.array([len(t) for t in train])
    per_epoch = math.ceil(len(train) / pcfg.batch_size)
    total = per_epoch * pcfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(pcfg.warmup_ratio * total), total)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=pcfg.mask_probability)
    checkpoint = Checkpoint(work / "last.pt", {"fingerprint": key}, fix="delete it to start the pretraining over")
    saved = checkpoint.load()  # None when absent or of another pretraining; a broken file is one line
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        done, before = saved["done"], saved["before"]
        console.print(f"pretrain: resuming from {checkpoint.path} at step {done} of {total}")
    else:
        done, before = 0, mlm_accuracy(model, held, tokenizer, cfg, device, amp)
    resumed_from = done or None

    def save(done: int) -> None:
        checkpoint.save_blob({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "done": done,
                              "before": before, "rng": torch.get_rng_state()})

    with make_progress(console) as progress:
        for epoch in range(done // per_epoch, pcfg.epochs):
            batches = train_batches(lengths, pcfg.batch_size, np.random.default_rng(pcfg.seed + epoch))
            task = progress.add_task(f"pretrain epoch {epoch + 1}/{pcfg.epochs}", total=len(batches),
                                     completed=done - epoch * per_epoch, info="")
            model.train()
            for step in range(done - epoch * per_epoch, len(batches)):
                loss = mlm_step(model, batch(train, batches[step], collator, device), (optimizer, scheduler, scaler),
                                amp, cfg.train.grad_clip)
                done += 1
                progress.update(task, completed=step + 1, info=f"loss {loss.item():.3f}")
                if (pcfg.checkpoint_every and done % pcfg.checkpoint_every == 0) or step + 1 == len(batches):
                    save(done)
            progress.remove_task(task)
    after = mlm_accuracy(model, held, tokenizer, cfg, device, amp)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    checkpoint.delete()
    return {"before": before, "after": after, "epochs": pcfg.epochs, "steps": total, "train_texts": len(train),
            "held_out_texts": len(held), "resumed_from_step": resumed_from, "device": str(device),
            "precision": str(amp).replace("torch.", "") if amp else "fp32"}


def mlm_step(model, inputs: dict, steppers: tuple, amp, grad_clip: float) -> torch.Tensor:
    """One optimizer step on a masked batch (autocast, gradient scaling for fp16, clipping); returns its loss."""
    optimizer, scheduler, scaler = steppers
    with torch.autocast(inputs["input_ids"].device.type, dtype=amp, enabled=amp is not None):
        loss = model(**inputs).loss
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def main(argv: list[str] | None = None) -> int:
    """Continue the encoder's masked-LM pretraining on the competition's texts; writes pretrain.out."""
    parser = cli.parser("comp.pretrain", main.__doc__)
    parser.add_argument("--force", action="store_true", help="replace pretrain.out even when it holds this run")
    args = parser.parse_args(argv)

    def body() -> int:
        console = cli.console(args.quiet)
        pretrain(cli.load_config(args, console), console, args.force)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
