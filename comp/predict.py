"""`python -m comp.predict`: predict any table with a finished run's folds (--run) or an exported bundle
(--bundle). It needs neither the training table nor folds.csv and downloads nothing: each fold's model is
rebuilt from its saved weights."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from safetensors.torch import load_file

from comp import cli
from comp.artifacts import atomic_path, read_sealed_json, write_npy
from comp.classical.baselines import load_classical
from comp.classical.stacking import Stacker
from comp.classical.text import Counts
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.nn import loop
from comp.nn.batching import Rows, Truncation, tokenize
from comp.nn.hardware import layer_split, resolve_device, resolve_precision
from comp.nn.model import build_model, hold_for_inference, load_tokenizer, pad_id
from comp.outputs import bundle
from comp.outputs.collect import (
    average_probabilities,
    is_complete,
    outputs_stamp,
    read_config,
    read_full,
    submission_frame,
    verify_fold,
)
from comp.outputs.costs import rows_per_second
from comp.outputs.decide import decided
from comp.tables import identity
from comp.tables.features import MetaEncoder
from comp.tables.read import Competition, _load_sample, load_table


@dataclass
class FoldModel:
    """One trained fold: the config it was trained with, the folder of its model files, its classes."""

    cfg: Config
    path: Path
    classes: list[str]


@dataclass
class Member:
    """A run of the prediction, with its weight in the blend (1 for a single run)."""

    name: str
    weight: float
    folds: list[FoldModel]


def run_folds(cfg: Config, with_full: bool = False) -> list[FoldModel]:
    """Every fold of cfg's run, each finished and matching the sha256 it recorded (`with_full`: then its
    full-data refit, as one more fold). The model is the one at cfg's model.name_or_path, which must hold the
    files the folds were trained from (it may have moved)."""
    folds = []
    for k in range(cfg.folds.n_splits):
        if not is_complete(cfg, k):
            raise CompError(f"fold {k} of run {cfg.run.name!r} is not finished ({cfg.fold_dir(k) / 'metrics.json'} "
                            f"missing): train it first with python -m comp.train --fold {k}")
        record = verify_fold(cfg, k)
        trained = read_config(cfg.fold_dir(k) / "config.toml", cfg.root, record)
        if "content" in record:  # older folds name their model by path, in their own config
            trained = trained.replace("model", name_or_path=cfg.model.name_or_path)
            if identity.changed(record["content"], {"model": identity.model_digest(trained)}, trained):
                raise CompError(f"model.name_or_path {cfg.model.name_or_path!r} does not hold the model fold {k} of "
                                f"run {cfg.run.name!r} was trained from: point it at that model's folder")
        folds.append(FoldModel(trained, cfg.fold_dir(k), record["classes"]))
    if with_full:  # the refit of the config the folds trained with
        record = read_full(folds[0].cfg.replace("run", name=cfg.run.name))
        trained = read_config(cfg.full_dir / "config.toml", cfg.root, record)
        folds.append(FoldModel(trained.replace("model", name_or_path=cfg.model.name_or_path), cfg.full_dir,
                               record["classes"]))
    return folds


def bundle_members(root: Path, base: Path | None = None) -> tuple[list[Member], Stacker | None, dict | None]:
    """The runs of a bundle (checked file by file), their folds' models pointed at the bundle's encoders (or, for
    a bundle exported with --base, at `base`, checked against the recorded digest), and its level-2 model when
    the bundle is a stack, and its decision rule when it has one."""
    manifest = bundle.read_manifest(root)
    members = []
    for m in manifest["members"]:
        encoders = external_base(m, base) if m.get("base") else root / "encoders" / m["name"]
        folds = []
        for k in range(m["folds"]):
            path = root / "runs" / m["name"] / f"fold_{k}"
            trained = read_config(path / "config.toml", root)
            if trained.model.kind == "encoder":
                trained = trained.replace("model", name_or_path=str(encoders), gguf_file="")
            folds.append(FoldModel(trained, path, manifest["classes"]))
        members.append(Member(m["name"], m["weight"], folds))
    return members, Stacker.load(root / "stack") if manifest.get("combine") == "stack" else None, manifest.get("decision")


def external_base(member: dict, base: Path | None) -> Path:
    """The base model folder a LoRA member exported with --base names: --base here, with the same digest."""
    recorded = member["base"]["digest"]
    if base is None:
        raise CompError(f"run {member['name']!r} of this bundle was exported without its base model (digest "
                        f"{recorded}): pass --base with the folder of that model")
    if not identity.folder_matches(base, recorded):
        raise CompError(f"--base {base} is not the base model run {member['name']!r} trained on (its digest "
                        f"{identity.folder_digest(base) if base.is_dir() else 'missing'} is not {recorded}): pass "
                        "the folder of the model the run trained on")
    return base


def run_decision(cfg: Config) -> dict | None:
    """The decision rule the run's last submit used (--decide), if it used one."""
    path = cfg.run_dir / "decision.json"
    if not path.is_file():
        return None
    rule = read_sealed_json(path, "rerun python -m comp.submit --decide")
    if rule.get("outputs") is None or rule["outputs"] != outputs_stamp(cfg):
        raise CompError(f"{path} was fitted on folds of run {cfg.run.name!r} that were retrained since: rerun python -m "
                        "comp.submit --decide (or without --decide, which removes it)")
    return rule


def fold_predictor(fm: FoldModel, device_name: str | None, bases: dict | None = None):
    """One fold's model, loaded: a function from (table, texts, console[, tokens]) to its logits for those rows.
    `tokens`: the texts' token ids by tokenizer and truncation, which the folds predicting the same rows share (a
    run's folds share both, so its rows are tokenized once). `bases`: LoRA folds' models by their [model]
    settings, shared the same way, so the base model is loaded once and each fold only loads its adapters and
    head into it."""
    devices = device_name.split(",") if device_name else []
    cfg = fm.cfg if not devices else fm.cfg.replace("train", device=devices[0])
    if cfg.model.kind != "encoder":
        model = load_classical(cfg.model.kind, fm.path, len(fm.classes))
        meta = getattr(model.model, "meta", None)  # a linear run's metadata encoder (gbm: its own ordinal codes)

        def classical_logits(table, texts: list[str], console: Console, tokens: dict | None = None) -> np.ndarray:
            if meta is not None:
                meta.check_seen(table, "the table to predict")
            if tokens is not None:  # the rows' n-gram counts, which the folds predicting them share
                model.model.counts = tokens.setdefault("n-gram counts", Counts())
            return model.logits(table, texts)

        return classical_logits
    device = resolve_device(cfg.train)
    encoder = MetaEncoder.load(fm.path / "encoders.json")
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    lora = cfg.model.lora.r > 0  # its folds hold only what trained: the base comes from model.name_or_path
    # several devices: a LoRA run's base is split over them by layers; a fold trained in full fits the first
    placement = layer_split(devices) if lora and len(devices) > 1 else None
    key = (cfg.model, cfg.root, cfg.data.task, cfg.data.text_pair, device_name, encoder.width, len(fm.classes))
    model = (bases or {}).get(key) if lora else None
    if model is None:
        model = build_model(cfg.model, encoder.width, len(fm.classes), pretrained=lora, root=cfg.root,
                            task=cfg.data.task, pair_sep=tokenizer.sep_token_id if cfg.data.text_pair else None,
                            placement=placement, tcfg=cfg.train)
        if placement:
            model.place(device)
        else:
            model.to(device)
        if lora and bases is not None:
            bases[key] = model
    model.load_state_dict(load_file(str(fm.path / "model.safetensors")))
    hold_for_inference(model, resolve_precision(cfg.train, device))

    def logits(table, texts: list[str], console: Console, tokens: dict | None = None) -> np.ndarray:
        encoder.check_seen(table, "the table to predict")
        key = (cfg.model.name_or_path, Truncation.of(cfg.model))
        cache = {} if tokens is None else tokens
        if key not in cache:
            cache[key] = tokenize(tokenizer, texts, Truncation.of(cfg.model))
        rows, precision = Rows(cache[key], encoder.transform(table)), resolve_precision(cfg.train, device)
        loop.check_packing(model, rows, pad_id(tokenizer), device, precision, console, f"predict {fm.path.name}")
        with loop.make_progress(console) as progress:
            return loop.predict(model, rows, cfg.train.eval_batch_size, pad_id(tokenizer), device, precision,
                                progress, f"predict {fm.path.name}")

    return logits


CHUNK_ROWS = 100_000  # rows predicted at once: a table's tokens and features are made a chunk at a time


def member_inputs(cfg: Config, test: Path, inputs: dict) -> tuple[pd.DataFrame, list[str]]:
    """The table to predict as a run's config reads it: its rows and its texts (the run's own data.text,
    separator, pair and template). Runs that read the same text share one entry of `inputs`."""
    key = (cfg.data, cfg.model.kind == "encoder")  # the template is read by encoder runs only
    if key not in inputs:
        inputs[key] = load_table(cfg, test)
    return inputs[key]


def member_logits(m: Member, table: pd.DataFrame, texts: list[str], device: str | None, bases: dict,
                  console: Console, chunk_rows: int = CHUNK_ROWS) -> list[np.ndarray]:
    """Each fold's logits for the table, predicted chunk_rows rows at a time, so that no more than a chunk's
    tokens and features are held at once. An encoder's folds are loaded one at a time (a table of one chunk is
    tokenized once for all of them); a classical run's small models all at once, each chunk's features made once."""
    starts = range(0, len(table), chunk_rows)
    classical = bool(m.folds) and m.folds[0].cfg.model.kind != "encoder"
    groups = [m.folds] if classical else [[fm] for fm in m.folds]  # the folds that predict a chunk together
    whole = {} if len(starts) == 1 else None  # one chunk: its tokens serve every fold
    out = []
    for group in groups:
        started, predictors = time.perf_counter(), [fold_predictor(fm, device, bases) for fm in group]
        parts = []
        for i in starts:
            shared = whole if whole is not None else {}
            parts.append([p(table.iloc[i:i + chunk_rows], texts[i:i + chunk_rows], console, shared)
                          for p in predictors])
        out += [np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, len(fm.classes)), np.float32)
                for k, fm in enumerate(group)]
        console.print(f"{m.name} {', '.join(fm.path.name for fm in group)}: {len(table)} rows in "
                      f"{time.perf_counter() - started:.1f}s" + (f" ({len(starts)} chunks)" if len(starts) > 1 else ""))
    return out


def predict(members: list[Member], test: Path, out: Path, sample: Path | None = None, device: str | None = None,
            logits_dir: Path | None = None, console: Console | None = None, stacker: Stacker | None = None,
            decision: dict | None = None, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Predict `test` with every fold of every member (chunk_rows rows at a time): fold-averaged probabilities
    per run, weighted over runs (or combined by the stack's level-2 model); write the submission (and each
    fold's logits under logits_dir/<run>/)."""
    console = console or cli.console()
    cfg = members[0].folds[0].cfg
    classes = members[0].folds[0].classes
    if any(fm.classes != classes or fm.cfg.data.task != cfg.data.task for m in members for fm in m.folds):
        raise CompError("the folds to predict with were trained with different classes or tasks: retrain them with "
                        "--force")
    logits, per_run, inputs, bases = {}, [], {}, {}
    for m in members:
        table, texts = member_inputs(m.folds[0].cfg, test, inputs)
        logits[m.name] = member_logits(m, table, texts, device, bases, console, chunk_rows)
        per_run.append(average_probabilities(logits[m.name], cfg.data.task))
    if stacker is not None:
        probs = stacker.predict(per_run)
    else:
        probs = sum(m.weight * p for m, p in zip(members, per_run, strict=True))
    if decision is not None:  # the labels the submission's decision rule chose
        probs = decided(probs, decision)
    comp = Competition(table.iloc[:0], table, None, classes, np.zeros(0, np.int64), [], texts, cfg.data.id)
    if sample is not None:
        comp.sample = _load_sample(cfg.replace("data", sample_submission=str(sample.resolve())), table)
    frame = submission_frame(cfg, comp, probs)
    if logits_dir is not None:
        write_npy(logits_dir / "ids.npy", table[cfg.data.id].to_numpy(dtype=str))
        for name, fold_logs in logits.items():
            for k, lg in enumerate(fold_logs):
                write_npy(logits_dir / name / f"fold_{k}.npy", lg)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    how = "stacked" if stacker else ", ".join(f"{m.name} × {m.weight:.3f}" for m in members)
    console.print(f"wrote {out} ({len(frame)} rows; {how})")
    return {"path": str(out), "logits": logits, "probabilities": probs}


def estimate(members: list[Member], test: Path, rows: int, device: str | None = None, sample_rows: int = 512,
             console: Console | None = None) -> dict[str, list[float]]:
    """Each fold's load time and rows per second on the first sample_rows rows of `test` (after a short warm-up
    that the first batches' one-time costs go into), and the projected time for `rows` rows (load + rows /
    speed); prints a table, writes nothing."""
    console = console or cli.console()
    speeds, total, inputs = {}, 0.0, {}
    for m in members:
        table, texts = member_inputs(m.folds[0].cfg, test, inputs)
        table, texts = table.iloc[:sample_rows], texts[:sample_rows]
        speeds[m.name] = []
        for fm in m.folds:
            started = time.perf_counter()
            predictor = fold_predictor(fm, device)
            loaded = time.perf_counter()
            predictor(table.iloc[:16], texts[:16], console)  # warm-up
            speed = rows_per_second(predictor, len(table), table, texts, console)
            seconds = loaded - started + rows / speed
            speeds[m.name].append(round(speed, 1))
            total += seconds
            console.print(f"{m.name} {fm.path.name}: load {loaded - started:.1f}s, {speed:.1f} rows/s -> "
                          f"{seconds / 60:.1f} min for {rows} rows")
    console.print(f"estimate for {rows} rows: {total / 60:.1f} min in all ({sum(map(len, speeds.values()))} folds, "
                  f"measured on {len(table)} rows)")
    return speeds


def main(argv: list[str] | None = None) -> int:
    """Predict a table with a finished run or a bundle: fold-averaged probabilities, written as a submission."""
    parser = cli.parser("comp.predict", main.__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="a finished run of this project (default: run.name of the config)")
    source.add_argument("--bundle", metavar="DIR", help="a bundle written by comp.export (no config, no data needed)")
    parser.add_argument("--test", required=True, help="the table to predict (csv, tsv, jsonl, parquet)")
    parser.add_argument("--out", help="the submission CSV to write (required unless --estimate)")
    parser.add_argument("--estimate", type=int, metavar="ROWS", help="only measure rows/s per fold on a sample of "
                        "the table and print the projected time for ROWS rows")
    parser.add_argument("--sample", help="a sample submission whose columns and id order the output takes")
    parser.add_argument("--device", "--devices", dest="device", help="cpu, cuda or cuda:N (default: the run's "
                        "train.device); cuda:0,cuda:1 splits a LoRA run's base model by layers over those GPUs")
    parser.add_argument("--save-logits", metavar="DIR", help="also write each fold's logits (<run>/fold_<k>.npy, ids.npy)")
    parser.add_argument("--base", metavar="DIR", help="the base model folder of a bundle exported with --base")
    parser.add_argument("--with-full", action="store_true", help="with --run: add the run's full-data refit as one "
                        "more fold")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, metavar="N", help="rows whose tokens and "
                        f"features are made and predicted at once (default {CHUNK_ROWS:,}): bounds the memory of a "
                        "large table")
    args = parser.parse_args(argv)
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    console = cli.console(args.quiet)
    stacker = None
    if args.bundle:
        members, stacker, decision = bundle_members(Path(args.bundle), Path(args.base) if args.base else None)
    else:
        if args.run:
            args.set = [*args.set, f"run.name={args.run}"]
        cfg = cli.load_config(args, console)
        members, decision = [Member(cfg.run.name, 1.0, run_folds(cfg, args.with_full))], run_decision(cfg)
    if args.estimate is not None:
        if args.estimate < 1:
            raise CompError(f"--estimate {args.estimate}: give the number of rows to project for (>= 1)")
        estimate(members, Path(args.test), args.estimate, args.device, console=console)
        return 0
    if not args.out:
        raise CompError("--out is missing: name the submission file to write (or pass --estimate ROWS)")
    if args.chunk_rows < 1:
        raise CompError(f"--chunk-rows {args.chunk_rows}: must be at least 1")
    predict(members, Path(args.test), Path(args.out), Path(args.sample) if args.sample else None, args.device,
            Path(args.save_logits) if args.save_logits else None, console, stacker, decision, args.chunk_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
