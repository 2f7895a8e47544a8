"""`python -m comp.predict`: predict any table with a finished run's folds; it needs neither the training table
nor folds.csv, and downloads nothing (each fold's model is rebuilt from its saved weights)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tomllib
import torch
from rich.console import Console
from safetensors.torch import load_file

from comp import cli, config, engine
from comp.artifacts import atomic_path, write_npy
from comp.baselines import load_classical
from comp.config import Config
from comp.data import Competition, _load_sample, load_table
from comp.engine import Rows, make_progress, resolve_device, resolve_precision
from comp.errors import CompError, run_cli
from comp.features import MetaEncoder
from comp.model import build_model, load_tokenizer
from comp.outputs import average_probabilities, is_complete, submission_frame, verify_fold


def fold_config(cfg: Config, fold: int, record: dict) -> Config:
    """The resolved config the fold was trained with (its config.toml), checked against the hash it recorded."""
    path = cfg.fold_dir(fold) / "config.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise CompError(f"{path} is missing or unreadable: retrain that fold with --force") from None
    trained = config.from_dict(raw, root=cfg.root, source=str(path))
    if trained.hash() != record.get("config_hash"):
        raise CompError(f"{path} does not match the config fold {fold} recorded (altered?): retrain it with --force")
    return trained


def encoder_logits(cfg: Config, out: Path, n_classes: int, table, texts: list[str], device: torch.device,
                   console: Console) -> np.ndarray:
    """An encoder fold's logits: its metadata encoders and weights loaded into the architecture (no download)."""
    encoder = MetaEncoder.load(out / "encoders.json")
    model = build_model(cfg.model, encoder.width, n_classes, pretrained=False, root=cfg.root)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    tokens = engine.tokenize(tokenizer, texts, cfg.model.max_length)
    rows = Rows(tokens, encoder.transform(table))
    with make_progress(console) as progress:
        return engine.predict(model.to(device), rows, cfg.train.eval_batch_size, tokenizer.pad_token_id, device,
                              resolve_precision(cfg.train, device), progress, f"predict {out.name}")


def fold_logits(cfg: Config, fold: int, table, texts: list[str], device_name: str | None,
                console: Console) -> tuple[np.ndarray, dict]:
    """One finished fold's logits for the table's rows, after checking its files' sha256."""
    if not is_complete(cfg, fold):
        raise CompError(f"fold {fold} of run {cfg.run.name!r} is not finished ({cfg.fold_dir(fold) / 'metrics.json'} "
                        f"missing): train it first with python -m comp.train --fold {fold}")
    record = verify_fold(cfg, fold)
    trained = fold_config(cfg, fold, record)
    if device_name is not None:
        trained = trained.replace("train", device=device_name)
    out = cfg.fold_dir(fold)
    if trained.model.kind != "encoder":
        return load_classical(trained.model.kind, out, len(record["classes"])).logits(table, texts), record
    device = resolve_device(trained.train)
    return encoder_logits(trained, out, len(record["classes"]), table, texts, device, console), record


def predict(cfg: Config, test: Path, out: Path, sample: Path | None = None, device: str | None = None,
            logits_dir: Path | None = None, console: Console | None = None) -> dict:
    """Predict `test` with every fold of cfg's run; write the fold-averaged submission (and each fold's logits)."""
    console = console or cli.console()
    table, texts = load_table(cfg, test)
    ids = table[cfg.data.id].to_numpy(dtype=str)
    logits, records = [], []
    for k in range(cfg.folds.n_splits):
        started = time.perf_counter()
        lg, record = fold_logits(cfg, k, table, texts, device, console)
        logits.append(lg)
        records.append(record)
        console.print(f"fold {k}: {len(table)} rows in {time.perf_counter() - started:.1f}s")
    classes = records[0]["classes"]
    if any(r["classes"] != classes for r in records):
        raise CompError(f"the folds of run {cfg.run.name!r} were trained with different classes: retrain it with --force")
    comp = Competition(table.iloc[:0], table, None, classes, np.zeros(0, np.int64), [], texts, cfg.data.id)
    if sample is not None:
        comp.sample = _load_sample(cfg.replace("data", sample_submission=str(sample)), table)
    frame = submission_frame(cfg, comp, average_probabilities(logits))
    if logits_dir is not None:
        write_npy(logits_dir / "ids.npy", ids)
        for k, lg in enumerate(logits):
            write_npy(logits_dir / f"fold_{k}.npy", lg)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    console.print(f"wrote {out} ({len(frame)} rows, {cfg.folds.n_splits} folds of run {cfg.run.name!r})")
    return {"path": str(out), "logits": logits, "ids": ids}


def main(argv: list[str] | None = None) -> int:
    """Predict a table with a finished run: fold-averaged probabilities, written as a submission."""
    parser = cli.parser("comp.predict", main.__doc__)
    parser.add_argument("--run", help="the finished run (default: run.name of the config)")
    parser.add_argument("--test", required=True, help="the table to predict (csv, tsv, jsonl, parquet)")
    parser.add_argument("--out", required=True, help="the submission CSV to write")
    parser.add_argument("--sample", help="a sample submission whose columns and id order the output takes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the run's train.device)")
    parser.add_argument("--save-logits", metavar="DIR", help="also write each fold's logits (fold_<k>.npy, ids.npy)")
    args = parser.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    if args.run:
        args.set = [*args.set, f"run.name={args.run}"]
    console = cli.console(args.quiet)
    cfg = cli.load_config(args, console)
    predict(cfg, Path(args.test), Path(args.out), Path(args.sample) if args.sample else None, args.device,
            Path(args.save_logits) if args.save_logits else None, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
