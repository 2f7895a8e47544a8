"""model.chunks: a long text read whole in overlapping windows, each encoded, the windows' vectors pooled into
one before the head; batches count windows; train, predict and the bundle path take it."""

import numpy as np
import pandas as pd
import pytest
import torch

from comp import folds, predict, submit, train
from comp.config import ModelConfig
from comp.nn import batching
from comp.nn.batching import WINDOW, Rows, Truncation
from comp.nn.model import build_model, load_tokenizer
from tests.conftest import assert_user_error, snapshot, write_project

LONG = " ".join(["the dress fits and the fabric color was very plain"] * 6)


@pytest.fixture
def tok(tiny_model):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))


def windows_of(ids: np.ndarray) -> list[list[int]]:
    return [list(w[w != WINDOW]) for w in np.split(ids, np.flatnonzero(ids == WINDOW))]


def test_windows_cover_the_text_from_its_head_with_the_stride(tok):
    body = tok(LONG, add_special_tokens=False)["input_ids"]
    limit = Truncation(16, chunks=4, stride=4)
    wins = windows_of(batching.tokenize(tok, [LONG], limit)[0])
    assert len(wins) == 4 and all(len(w) <= 16 and w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id for w in wins)
    inner = [w[1:-1] for w in wins]
    assert inner[0] == body[:14] and all(a[-4:] == b[:4] for a, b in zip(inner, inner[1:], strict=False))
    assert inner[3] == body[30:44]  # each window starts 14 - 4 = 10 tokens after the one before
    short = windows_of(batching.tokenize(tok, ["lovely"], limit)[0])
    assert short == [tok("lovely")["input_ids"]]  # a short text is one window
    whole = windows_of(batching.tokenize(tok, [LONG], Truncation(16, chunks=20, stride=4))[0])
    assert whole[-1][-2] == body[-1] and len(whole) < 20  # enough windows: the text is read to its end


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
def test_chunked_rows_equal_their_windows_encoded_one_by_one(tiny_model, tok, pooling):
    mcfg = ModelConfig(name_or_path=str(tiny_model), max_length=16, chunks=4, stride=4, pooling="mean",
                       chunk_pooling=pooling, head_hidden=(8,))
    torch.manual_seed(0)
    model = build_model(mcfg, 2, 3).eval()
    texts = [LONG, "lovely dress", LONG[:80]]
    meta = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    rows = Rows(batching.tokenize(tok, texts, Truncation.of(mcfg)), meta)
    ids, mask, meta, owner = batching.collate(rows, np.arange(3), tok.pad_token_id, torch.device("cpu"))
    assert owner.tolist() == sorted(owner.tolist()) and len(owner) == sum(len(windows_of(t)) for t in rows.tokens)
    with torch.no_grad():
        batched = model(ids, mask, meta, None, owner)
        expected = []
        for r, t in enumerate(rows.tokens):
            vectors = torch.stack([model.encoder(input_ids=torch.tensor([w])).last_hidden_state[0].mean(0)
                                   for w in windows_of(t)])
            if pooling == "max":
                pooled = vectors.max(0).values
            elif pooling == "attention":
                pooled = (torch.softmax(model.window_score(vectors).squeeze(1), 0)[:, None] * vectors).sum(0)
            else:
                pooled = vectors.mean(0)
            expected.append(model.out(model.head(model.fuse(pooled[None], meta[r:r + 1]))) + model.wide(meta[r:r + 1]))
    torch.testing.assert_close(batched, torch.cat(expected), atol=1e-5, rtol=1e-4)


def test_batches_count_windows():
    rng = np.random.default_rng(0)
    windows = rng.integers(1, 6, size=200)
    lengths = windows * 16
    batches = batching.train_batches(lengths, 12, rng, pool=4, windows=windows)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    assert all(windows[b].sum() <= 12 for b in batches)
    infer = batching.inference_batches(lengths, 12, windows=windows)
    assert sorted(np.concatenate(infer).tolist()) == list(range(200)) and all(windows[b].sum() <= 12 for b in infer)


def test_a_chunked_run_trains_and_predicts_what_submit_wrote(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model)
    sets = ["--quiet", "--set", "model.max_length=12", "--set", "model.chunks=3", "--set", "model.stride=2"]
    assert folds.main(["--config", str(cfg), *sets]) == 0
    assert train.main(["--config", str(cfg), "--all", *sets]) == 0 and submit.main(["--config", str(cfg), *sets]) == 0
    out, data = tmp_path / "p.csv", cfg.parent / "data"
    assert predict.main(["--config", str(cfg), "--test", str(data / "test.csv"), "--out", str(out),
                         "--sample", str(data / "sample_submission.csv"), *sets]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


@pytest.mark.parametrize("sets, needle", [
    (["model.chunks=0"], "model.chunks must be >= 1"),
    (["model.chunks=2", "model.truncation=tail"], "model.chunks > 1 reads the text from its head"),
    (["model.stride=30", "model.max_length=48"], "model.stride"),
    (["model.chunks=2", "data.text_pair=['title', 'body']"], "a text pair (data.text_pair) is cut"),
])
def test_chunk_config_errors_are_one_line(project, capsys, sets, needle):
    before = snapshot(project.parent)
    assert_user_error(folds.main(["--config", str(project), *(a for s in sets for a in ("--set", s))]), capsys, needle)
    assert snapshot(project.parent) == before
