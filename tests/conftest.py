"""Fixtures: a tiny random BERT with its own WordPiece tokenizer, and a small competition written to disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

WORDS = {1: ["awful", "broken", "refund", "worst", "ugly"],
         2: ["fine", "okay", "average", "plain", "decent"],
         3: ["lovely", "perfect", "great", "comfy", "stunning"]}
FILLER = ["the", "dress", "fits", "and", "fabric", "color", "size", "was", "very", "it", "feels", "shirt"]


def _text(rng: np.random.Generator, label: int) -> str:
    words = list(rng.choice(FILLER, size=rng.integers(3, 20))) + list(rng.choice(WORDS[label], size=2))
    rng.shuffle(words)
    return " ".join(words)


def make_tables(n_train: int = 90, n_test: int = 30, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Train / test / sample submission / solution tables whose text and metadata carry the label."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.array([1, 2, 3] * (n // 3 + 1))[:n]
    rng.shuffle(labels)
    df = pd.DataFrame({
        "id": np.arange(1000, 1000 + n),
        "title": [None if i % 4 == 0 else f"title {WORDS[y][0]}" for i, y in enumerate(labels)],
        "body": [_text(rng, y) for y in labels],
        "shop": [None if i % 7 == 0 else ["north", "south", "east"][y - 1] for i, y in enumerate(labels)],
        "count": np.where(np.arange(n) % 9 == 0, np.nan, labels * 10 + rng.normal(0, 1, n)),
        "label": labels,
    })
    train, test = df.iloc[:n_train].copy(), df.iloc[n_train:].copy()
    shuffled = test.sample(frac=1.0, random_state=seed)  # the sample submission's order differs from test's
    return {"train.csv": train,
            "test.csv": test.drop(columns=["label"]),
            "sample_submission.csv": pd.DataFrame({"id": shuffled["id"], "label": 1}),
            "solution.csv": test[["id", "label"]]}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) and a WordPiece tokenizer trained on the fixture words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [" ".join(w) for w in WORDS.values()] + [" ".join(FILLER), "title . north south east"]
    tok.train_from_iterator(corpus * 5, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    return out


CONFIG = """
[data]
train = "data/train.csv"
test = "data/test.csv"
sample_submission = "data/sample_submission.csv"
solution = "data/solution.csv"
id = "id"
text = ["title", "body"]
categorical = ["shop"]
numeric = ["count"]
label = "label"

[folds]
n_splits = 3
seed = 7

[run]
name = "tiny"

[model]
name_or_path = "{model}"
pooling = "cls"
head_hidden = [16]
dropout = 0.1
max_length = 48

[train]
epochs = 2
batch_size = 16
eval_batch_size = 7
encoder_lr = 1e-3
head_lr = 3e-3
patience = 2
device = "cpu"
precision = "fp32"
"""


@pytest.fixture
def project(tmp_path, tiny_model) -> Path:
    """A competition folder: data/*.csv and comp.toml pointing at the tiny model; returns the config path."""
    return write_project(tmp_path, tiny_model)


def write_project(root: Path, model: Path | str, tables: dict[str, pd.DataFrame] | None = None) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name, table in (tables or make_tables()).items():
        table.to_csv(root / "data" / name, index=False)
    cfg = root / "comp.toml"
    cfg.write_text(CONFIG.format(model=str(model).replace(os.sep, "/")), encoding="utf-8")
    return cfg


def trained_project(root: Path, model: Path) -> Path:
    """write_project, then folds made and every fold trained once through the CLIs; returns the config path."""
    from comp import folds, train

    cfg = write_project(root, model)
    assert folds.main(["--config", str(cfg)]) == 0
    assert train.main(["--config", str(cfg), "--all"]) == 0
    return cfg


def tokenizer_variant(model: Path, out: Path, edit) -> Path:
    """A copy of a model folder at `out` whose tokenizer_config.json `edit` changed in place."""
    shutil.copytree(model, out)
    settings = json.loads((out / "tokenizer_config.json").read_text())
    edit(settings)
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


def fold0_oof(root: Path, model: Path, tables: dict, args: list[str]) -> np.ndarray:
    """A project at `root` on `model`: folds made, fold 0 trained with `args`; its OOF logits."""
    from comp import folds, train

    cfg = write_project(root, model, tables)
    assert folds.main(["--config", str(cfg), *args]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *args]) == 0
    return np.load(cfg.parent / "folds" / "tiny" / "fold_0" / "oof_logits.npy")


def snapshot(root: Path) -> dict[str, float]:
    """Every file under root with its modification time, to show a command wrote nothing."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def assert_user_error(code: int, capsys, *needles: str) -> str:
    """A user error: exit status 2, one line on stderr naming the problem, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("comp: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (initdb, pg_ctl), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    import shutil

    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (trust auth, its own data folder); yields its SQLAlchemy URL.
    PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user."""
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (3) is not installed (pip install -e '.[postgres]')")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres system user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="comp-pg-"))
    if prefix:
        shutil.chown(home, "postgres")
    data = home / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "comp", "--auth=trust", "-E", "UTF8"], **run)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "start", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c max_connections=50"], **run)
    try:
        yield f"postgresql://comp@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def own_copy(cfg: Path, tmp_path: Path) -> Path:
    """A test's own copy of a shared trained project (folds record what they were trained on, not where, so
    they stay valid in the copy): what the test retrains or alters leaves the other tests' project alone."""
    import shutil

    shutil.copytree(cfg.parent, tmp_path / "own")
    return tmp_path / "own" / cfg.name
