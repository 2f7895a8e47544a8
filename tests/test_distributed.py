"""One fold over several processes: DDP under torchrun (gloo on CPU) against a one-process run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from comp import config, folds, train
from comp.nn.batching import cached_tokenize, train_batches
from comp.nn.distributed import Dist, shard_batches
from comp.nn.loop import predict
from comp.nn.model import build_model, load_tokenizer
from comp.outputs import collect as outputs
from comp.outputs import runs
from comp.tables import splits
from comp.tables.features import MetaEncoder
from comp.tables.read import load_competition
from tests.conftest import make_tables, write_project


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_every_row_once_and_weight_to_the_global_mean(world):
    lengths = np.random.default_rng(0).integers(3, 60, size=103)
    batches = train_batches(lengths, 8 * world, np.random.default_rng(1))
    shards = [shard_batches(batches, Dist(r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = np.concatenate([index for s in shards for index, _ in s])
    assert np.array_equal(np.sort(seen), np.arange(len(lengths)))
    losses = np.random.default_rng(2).random(len(lengths))
    for step in range(len(shards[0])):
        parts = [s[step] for s in shards]
        assert all(len(index) > 0 for index, _ in parts)
        # DDP averages the ranks' gradients: the scaled per-rank means must average to the global batch's mean
        ddp = np.mean([scale * losses[index].mean() for index, scale in parts])
        whole = np.concatenate([index for index, _ in parts])
        assert ddp == pytest.approx(losses[whole].mean())
        assert max(len(i) for i, _ in parts) - min(len(i) for i, _ in parts) <= 1  # balanced shares


def _torchrun(cfg: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMP_DIST_BACKEND": "gloo", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "comp.train", "--config", str(cfg), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("loss", ["ce", "balanced_ce"])
def test_shard_scaling_is_exact_for_weighted_losses(loss):
    """DDP averages the ranks' gradients: with each rank's (class-weighted) mean loss scaled by its factor, the
    average over ranks and the sum over an accumulation group is the weighted mean over all the group's rows,
    whatever mix of classes each rank drew."""
    from comp.config import TrainConfig
    from comp.nn.objective import make_loss, row_weights

    rng = np.random.default_rng(0)
    y = np.array([0] * 14 + [1] * 4 + [2] * 2)
    rng.shuffle(y)
    logits = torch.from_numpy(rng.normal(size=(20, 3)).astype(np.float32))
    tcfg = TrainConfig(loss=loss)
    loss_fn, weights = make_loss(tcfg, y, 3, torch.device("cpu")), row_weights(tcfg, y, 3)
    batches = [np.arange(0, 9), np.arange(9, 20)]  # one accumulation group of two unequal batches
    world, target = 3, torch.from_numpy(y)
    total = sum(scale * loss_fn(logits[index], target[index]) / world
                for rank in range(world) for index, scale in shard_batches(batches, Dist(rank, world), 2, weights))
    assert float(total) == pytest.approx(float(loss_fn(logits, target)), rel=1e-6)


def test_torchrun_two_processes_match_one_process_run(tmp_path, tiny_model):
    tables = make_tables(n_train=120)
    still = tmp_path / "still"  # no dropout anywhere: the two runs take the same steps, within roundings
    shutil.copytree(tiny_model, still)
    settings = json.loads((still / "config.json").read_text())
    (still / "config.json").write_text(json.dumps({**settings, "hidden_dropout_prob": 0.0}))
    one = write_project(tmp_path / "one", still, tables)
    two = write_project(tmp_path / "two", still, tables)
    for cfg in (one, two):
        assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    # the same effective batch: 16 rows in one process, 8 on each of two; both end with a greedy soup of epochs
    soup = ["--set", "train.swa=soup", "--set", "train.swa_epochs=2", "--set", "model.dropout=0.0",
            "--set", "model.attention_dropout=0.0"]
    assert train.main(["--config", str(one), "--fold", "0", "--quiet", "--set", "train.batch_size=16", *soup]) == 0
    proc = _torchrun(two, 2, "--fold", "0", "--set", "train.batch_size=8", *soup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fold 0 done") == 1  # only rank 0 speaks
    a, b = one.parent / "folds" / "tiny" / "fold_0", two.parent / "folds" / "tiny" / "fold_0"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) == sorted(outputs.FILES)
    ra, rb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert (ra["processes"], rb["processes"]) == (1, 2)
    assert ra["swa"]["mode"] == rb["swa"]["mode"] == "soup"
    assert ra["n_train"] == rb["n_train"] and ra["n_val"] == rb["n_val"]
    assert np.array_equal(np.load(a / "oof_ids.npy"), np.load(b / "oof_ids.npy"))
    assert np.array_equal(np.load(a / "test_ids.npy"), np.load(b / "test_ids.npy"))
    # each rank fitted text_norm on the same rows (the one-process run's threads may round the sums differently)
    wa, wb = (load_file(str(p / "model.safetensors")) for p in (a, b))
    for k in ("center", "scale"):
        assert torch.allclose(wa[f"text_norm.{k}"], wb[f"text_norm.{k}"], rtol=1e-4, atol=1e-6)
    for ea, eb in zip(ra["history"], rb["history"], strict=True):
        assert eb["val_loss"] == pytest.approx(ea["val_loss"], rel=0.05)
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=0.05)

    # every validation and test row was predicted once, by the saved weights, and put back in its place
    cfg = config.load(two)
    comp = load_competition(cfg)
    split, _ = splits.load_folds(cfg, comp)
    tr, va = runs.split(split, 0)
    tok = load_tokenizer(cfg.model, cfg.root)
    tokens, _ = cached_tokenize(tok, comp.train_text, cfg.model.max_length, None)
    test_tokens, _ = cached_tokenize(tok, comp.test_text, cfg.model.max_length, None)
    encoder = MetaEncoder.load(b / "encoders.json")
    model = build_model(cfg.model, encoder.width, len(comp.classes), pretrained=False, root=cfg.root)
    model.load_state_dict(load_file(str(b / "model.safetensors")))
    cpu = torch.device("cpu")
    val = runs.Rows([tokens[i] for i in va], encoder.transform(comp.train.iloc[va]), comp.y[va])
    test = runs.Rows(test_tokens, encoder.transform(comp.test))
    assert np.allclose(predict(model, val, 5, tok.pad_token_id, cpu, None), np.load(b / "oof_logits.npy"), atol=1e-5)
    assert np.allclose(predict(model, test, 5, tok.pad_token_id, cpu, None), np.load(b / "test_logits.npy"), atol=1e-5)


def test_torchrun_refuses_fold_processes(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    proc = _torchrun(cfg, 2, "--all", "--jobs", "2")
    assert proc.returncode != 0 and "under torchrun every process trains the same fold" in proc.stderr
    assert not (tmp_path / "folds" / "tiny").exists()
