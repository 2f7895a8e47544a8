"""`python -m comp.export`: a self-contained bundle of a finished run (--run) or of a blend (--blend: weighted,
or stacked by a logistic level-2 model) for offline prediction:
`python -m comp.predict --bundle DIR --test hidden.csv --out sub.csv`."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from comp import __version__, cli
from comp.artifacts import atomic_dir, read_json, read_sealed_json, sha256
from comp.config import Config, resolve_model_path, to_toml
from comp.errors import CompError, run_cli
from comp.nn.hardware import resolve_device
from comp.nn.model import load_encoder, load_tokenizer
from comp.outputs import bundle
from comp.outputs.collect import MODEL_FILES, outputs_stamp, recorded_sums
from comp.outputs.decide import portable
from comp.predict import FoldModel, Member, estimate, run_decision, run_folds
from comp.tables import identity


def members_of(cfg: Config, run: str | None, blend: str | None,
               with_full: bool = False) -> tuple[list[Member], Path | None, dict | None]:
    """The runs to export with their weights: one run (weight 1; `with_full`: its refit as one more fold), or a
    blend's runs and weights; for a stack also the folder of its (checked) level-2 model; the decision rule
    when the submission had one (--decide)."""
    if blend is None:
        one = cfg.replace("run", name=run or cfg.run.name)
        return [Member(one.run.name, 1.0, run_folds(one, with_full))], None, run_decision(one)
    if with_full:
        raise CompError("--with-full adds one run's refit; a blend carries the refits it was made with (comp.blend "
                        "--with-full): drop --with-full")
    folder = cfg.replace("run", name=blend).run_dir
    if not (folder / "blend.json").is_file():
        raise CompError(f"blend {blend!r} has no {folder / 'blend.json'}: make it first with "
                        f"python -m comp.blend --runs ... --name {blend}")
    record = read_sealed_json(folder / "blend.json", "make the blend again with python -m comp.blend")
    stack = record.get("stack")
    if stack is not None and "sha256" not in stack:
        raise CompError(f"blend {blend!r} is a {stack.get('level2')} stack, which bundles cannot carry without a "
                        "pickle: stack with --stack logistic to export it")
    for name, digest in (stack or {}).get("sha256", {}).items():
        if sha256(folder / name) != digest:
            raise CompError(f"{folder / name} does not match blend.json (altered): make the blend again")
    stamps = record.get("member_outputs") or {}
    for name in record["runs"]:
        if stamps.get(name) != outputs_stamp(cfg.replace("run", name=name)):
            raise CompError(f"run {name!r} was retrained (or is unfinished) since blend {blend!r} was made: its weights, "
                            f"stack or decision would not fit it; make the blend again with python -m comp.blend")
    refits = record.get("with_full") or {}
    for name, digest in refits.items():
        if (recorded_sums(cfg.replace("run", name=name), "full") or {}).get("test_logits.npy") != digest:
            raise CompError(f"the refit of run {name!r} was retrained (or removed) since blend {blend!r} was made: make "
                            "the blend again with python -m comp.blend ... --with-full")
    weights = record["weights"] or [0.0] * len(record["runs"])
    members = [Member(name, float(w), run_folds(cfg.replace("run", name=name), name in refits))
               for name, w in zip(record["runs"], weights, strict=True) if stack or w > 0]  # a run of weight 0 adds nothing
    return members, folder if stack else None, record.get("decision")


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}


def trained_dtype(fm: FoldModel) -> torch.dtype | None:
    """The half dtype a fold's encoder ran in while it trained (what its metrics.json recorded, else an explicit
    train.precision), or None: fp32, or not known."""
    recorded = read_json(fm.path / "metrics.json").get("precision")
    return HALF.get(recorded if recorded is not None else fm.cfg.train.precision)


def copy_weights(src: Path, dst: Path, dtype: torch.dtype | None) -> None:
    """A fold's weights into the bundle: the encoder's floating tensors in `dtype` (the precision its matmuls
    saw in training; loading casts them back into the model's fp32 parameters), the head and wide path as they
    are; a plain copy when dtype is None."""
    if dtype is None:
        shutil.copyfile(src, dst)
        return
    weights = {k: v.to(dtype) if k.startswith("encoder.") and v.is_floating_point() else v
               for k, v in load_file(str(src)).items()}
    save_file(weights, str(dst))


def copy_member(m: Member, root: Path, base: Path | None = None) -> str:
    """A run's fold model files and resolved configs, and once its encoder's config and tokenizer (and, for a
    LoRA run, whose folds hold only adapters and head, its base weights); returns the dtype its encoder weights
    are stored in."""
    stored = set()
    for k, fm in enumerate(m.folds):
        kind = fm.cfg.model.kind
        if kind not in bundle.EXPORTABLE:
            raise CompError(f"run {m.name!r} is a {kind} run, which bundles cannot carry without a pickle: export "
                            f"runs of kind {' or '.join(bundle.EXPORTABLE)}")
        out = root / "runs" / m.name / f"fold_{k}"
        out.mkdir(parents=True)
        dtype = trained_dtype(fm) if kind == "encoder" else None
        stored.add(str(dtype or torch.float32).removeprefix("torch."))
        for name in MODEL_FILES[kind]:
            if name == "model.safetensors":
                copy_weights(fm.path / name, out / name, dtype)
            else:
                shutil.copyfile(fm.path / name, out / name)
        (out / "config.toml").write_text(to_toml(fm.cfg), encoding="utf-8")
    first = m.folds[0].cfg
    if first.model.kind == "encoder":
        encoders = root / "encoders" / m.name
        load_tokenizer(first.model, first.root).save_pretrained(encoders)
        if first.model.lora.r and base is not None:  # named, not carried: only its config beside the tokenizer
            AutoConfig.from_pretrained(base).save_pretrained(encoders)
        elif first.model.lora.r:  # the base once, in the half dtype it trained under (loading casts it back)
            base = load_encoder(dataclasses.replace(first.model, quantize="off"), root=first.root)
            base.to(trained_dtype(m.folds[0]) or torch.float32).save_pretrained(encoders)
        else:
            AutoConfig.from_pretrained(resolve_model_path(first.model.name_or_path, first.root),
                                       **({"gguf_file": first.model.gguf_file} if first.model.gguf_file else {})
                                       ).save_pretrained(encoders)
    return "/".join(sorted(stored))


def measure_speed(cfg: Config, members: list[Member], console) -> dict | None:
    """Rows per second of each fold on up to 256 rows of the configured test table, on this machine (None when
    the table is not there)."""
    test = cfg.path(cfg.data.test)
    if not test.is_file():
        return None
    quiet = cli.console(quiet=True)
    speeds = estimate(members, test, 10_000, console=quiet)
    device = str(resolve_device(members[0].folds[0].cfg.train))
    console.print(f"rows/s per fold on {device}: " + "; ".join(f"{n} {v}" for n, v in speeds.items()))
    return {"device": device, "runs": speeds}


def export(cfg: Config, out: Path, run: str | None = None, blend: str | None = None, console=None,
           base: Path | None = None, with_full: bool = False, replace: bool = False) -> dict:
    """Write the bundle into a temporary folder beside `out`, then move it into place (`replace`: over the bundle
    already there, once the new one is whole). `base`: LoRA members name this folder (their base model, checked by
    digest) instead of carrying its weights."""
    console = console or cli.console()
    if out.exists() and not replace:
        raise CompError(f"{out} already exists: remove it, pick another --out, or pass --replace")
    if out.exists() and not (out / "manifest.json").is_file():
        raise CompError(f"{out} is not a bundle (no manifest.json): --replace replaces only a bundle; pick another --out")
    members, stack, decision = members_of(cfg, run, blend, with_full)
    bases = {m.name: base_digest(m, base) for m in members} if base is not None else {}
    with atomic_dir(out) as tmp:  # with --replace, the old bundle leaves only once the new one is whole
        stored = {m.name: copy_member(m, tmp, base if m.name in bases else None) for m in members}
        if stack is not None:
            (tmp / "stack").mkdir()
            for name in ("stack.json", "stack.safetensors"):
                shutil.copyfile(stack / name, tmp / "stack" / name)
        speeds = measure_speed(cfg, members, console)
        manifest = {"combine": "stack" if stack else "weights", "rows_per_second": speeds,
                    "decision": decision and portable(decision),
                    "comp_version": __version__, "torch_version": torch.__version__,
                    "transformers_version": transformers.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "classes": members[0].folds[0].classes,
                    "members": [{"name": m.name, "weight": m.weight, "folds": len(m.folds),
                                 "kind": m.folds[0].cfg.model.kind, "encoder_weights": stored[m.name],
                                 **({"base": {"digest": bases[m.name]}} if m.name in bases else {})}
                                for m in members],
                    "cv": {m.name: [read_json(fm.path / "metrics.json").get("oof") for fm in m.folds] for m in members}}
        bundle.write_manifest(tmp, manifest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    how = "stacked" if stack else "weights " + ", ".join(f"{m.weight:.3f}" for m in members)
    console.print(f"wrote {out}: " + ", ".join(f"{m.name} ({len(m.folds)} folds)" for m in members)
                  + f", {how}; {size / 2**20:.1f} MiB")
    return {"path": str(out), "bytes": size}


def base_digest(m: Member, base: Path) -> str:
    """--base: the digest of the folder a LoRA member names instead of carrying, which must be the model it
    trained on."""
    first = m.folds[0].cfg
    if not first.model.lora.r:
        raise CompError(f"--base names the base model of LoRA runs; run {m.name!r} trained its whole encoder, "
                        "whose weights are its folds': drop --base")
    if not base.is_dir() or identity.folder_digest(base) != identity.model_digest(first):
        raise CompError(f"--base {base} is not the model run {m.name!r} trained on ({first.model.name_or_path}): "
                        "pass that model's folder")
    return identity.folder_digest(base)


def main(argv: list[str] | None = None) -> int:
    """Export a finished run or blend as a self-contained bundle for offline prediction."""
    parser = cli.parser("comp.export", main.__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", help="the finished run to export (default: run.name of the config)")
    which.add_argument("--blend", help="a blend made by comp.blend (its runs and weights)")
    parser.add_argument("--out", required=True, help="the bundle folder to create")
    parser.add_argument("--replace", action="store_true", help="replace the bundle already at --out (once the new "
                        "one is written whole)")
    parser.add_argument("--with-full", action="store_true", help="with --run: bundle the run's full-data refit "
                        "as one more fold (as comp.submit --with-full averages it)")
    parser.add_argument("--base", metavar="DIR", help="LoRA runs: name this base model folder (already uploaded) "
                        "instead of carrying its weights; predict then takes it as --base")
    args = parser.parse_args(argv)

    def body() -> int:
        console = cli.console(args.quiet)
        export(cli.load_config(args, console), Path(args.out), args.run, args.blend, console,
               Path(args.base) if args.base else None, args.with_full, args.replace)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
