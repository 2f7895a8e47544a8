"""The offline bundle: a run's (or a blend's) folds with everything prediction needs and nothing it must
download or unpickle. Layout: manifest.json (format, versions, members, classes, CV, the sha256 of every file),
runs/<run>/fold_<k>/ (the fold's model files and resolved config.toml), encoders/<run>/ (the encoder's
config.json and tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

from comp.artifacts import seal, sha256, write_sealed_json
from comp.errors import CompError

FORMAT = 1
EXPORTABLE = ("encoder", "linear", "gbm")


def write_manifest(root: Path, manifest: dict) -> None:
    """List the sha256 of every file under root, seal the manifest with its own hash, write it last."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {**manifest, "format": FORMAT, "files": {p.relative_to(root).as_posix(): sha256(p) for p in files}}
    write_sealed_json(root / "manifest.json", manifest)


def read_manifest(root: Path) -> dict:
    """The bundle's manifest, after checking its format, its own seal and the sha256 of every listed file."""
    path = root / "manifest.json"
    if not path.is_file():
        raise CompError(f"{root} is not a comp bundle ({path} missing): make one with python -m comp.export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CompError(f"{path} is unreadable (altered?): export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompError(f"{path}: bundle format {manifest.get('format') if isinstance(manifest, dict) else None!r} "
                        f"is not the one this comp reads ({FORMAT}): export it again with this version of comp")
    if manifest.get("check") != seal(manifest):
        raise CompError(f"{path} does not match its own checksum (altered): export the bundle again")
    for name, digest in manifest["files"].items():
        file = root / name
        if not file.is_file() or sha256(file) != digest:
            raise CompError(f"{file} is missing or does not match the bundle's manifest (altered or corrupted): "
                            "export the bundle again")
    return manifest
