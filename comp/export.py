"""`python -m comp.export`: a self-contained bundle of a finished run (--run) or of a fitted or equal-weight
blend (--blend) for offline prediction: `python -m comp.predict --bundle DIR --test hidden.csv --out sub.csv`."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from comp import __version__, bundle, cli
from comp.artifacts import read_json
from comp.config import Config, to_toml
from comp.errors import CompError, run_cli
from comp.model import load_tokenizer, resolve_model_path
from comp.outputs import MODEL_FILES
from comp.predict import Member, run_folds


def members_of(cfg: Config, run: str | None, blend: str | None) -> list[Member]:
    """The runs to export with their weights: one run (weight 1), or a blend's runs and weights."""
    if blend is None:
        return [Member(run or cfg.run.name, 1.0, run_folds(cfg.replace("run", name=run or cfg.run.name)))]
    path = cfg.replace("run", name=blend).run_dir / "blend.json"
    if not path.is_file():
        raise CompError(f"blend {blend!r} has no {path}: make it first with python -m comp.blend --runs ... --name {blend}")
    record = read_json(path)
    if record.get("weights") is None:
        raise CompError(f"blend {blend!r} is a stack: only blends with fitted or equal weights can be exported")
    return [Member(name, float(w), run_folds(cfg.replace("run", name=name)))
            for name, w in zip(record["runs"], record["weights"], strict=True)]


def copy_member(m: Member, root: Path) -> None:
    """A run's fold model files and resolved configs, and once its encoder's config and tokenizer."""
    for k, fm in enumerate(m.folds):
        kind = fm.cfg.model.kind
        if kind not in bundle.EXPORTABLE:
            raise CompError(f"run {m.name!r} is a {kind} run, which bundles cannot carry without a pickle: export "
                            f"runs of kind {' or '.join(bundle.EXPORTABLE)}")
        out = root / "runs" / m.name / f"fold_{k}"
        out.mkdir(parents=True)
        for name in MODEL_FILES[kind]:
            shutil.copyfile(fm.path / name, out / name)
        (out / "config.toml").write_text(to_toml(fm.cfg), encoding="utf-8")
    first = m.folds[0].cfg
    if first.model.kind == "encoder":
        encoders = root / "encoders" / m.name
        load_tokenizer(first.model, first.root).save_pretrained(encoders)
        AutoConfig.from_pretrained(resolve_model_path(first.model.name_or_path, first.root)).save_pretrained(encoders)


def export(cfg: Config, out: Path, run: str | None = None, blend: str | None = None, console=None) -> dict:
    """Write the bundle into a temporary folder beside `out`, then move it into place."""
    console = console or cli.console()
    if out.exists():
        raise CompError(f"{out} already exists: remove it or pick another --out")
    members = members_of(cfg, run, blend)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for m in members:
            copy_member(m, tmp)
        manifest = {"comp_version": __version__, "torch_version": torch.__version__,
                    "transformers_version": transformers.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "classes": members[0].folds[0].classes,
                    "members": [{"name": m.name, "weight": m.weight, "folds": len(m.folds),
                                 "kind": m.folds[0].cfg.model.kind} for m in members],
                    "cv": {m.name: [read_json(fm.path / "metrics.json").get("oof") for fm in m.folds] for m in members}}
        bundle.write_manifest(tmp, manifest)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    console.print(f"wrote {out}: " + ", ".join(f"{m.name} ({len(m.folds)} folds, weight {m.weight:.3f})" for m in members)
                  + f"; {size / 2**20:.1f} MiB")
    return {"path": str(out), "bytes": size}


def main(argv: list[str] | None = None) -> int:
    """Export a finished run or blend as a self-contained bundle for offline prediction."""
    parser = cli.parser("comp.export", main.__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", help="the finished run to export (default: run.name of the config)")
    which.add_argument("--blend", help="a blend made by comp.blend (its runs and weights)")
    parser.add_argument("--out", required=True, help="the bundle folder to create")
    args = parser.parse_args(argv)

    def body() -> int:
        console = cli.console(args.quiet)
        export(cli.load_config(args, console), Path(args.out), args.run, args.blend, console)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
