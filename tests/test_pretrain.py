"""comp.pretrain: masked-LM training on the competition's texts lowers the MLM loss, writes a model folder that
comp.train fine-tunes from, resumes after an interruption as if never stopped, and refuses bad input in one line."""

import json

import pandas as pd
import torch
from safetensors.torch import load_file

from comp import folds, pretrain, train
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

FAST = ["--set", "pretrain.epochs=3", "--set", "pretrain.lr=1e-3", "--set", "pretrain.batch_size=8",
        "--set", "pretrain.checkpoint_every=4", "--quiet"]


def out(cfg):
    return cfg.parent / "folds" / "pretrained"


def test_mlm_loss_falls_and_the_folder_fine_tunes(project):
    assert pretrain.main(["--config", str(project), *FAST]) == 0
    record = json.loads((out(project) / "pretrain.json").read_text())
    assert record["texts"] == 120 and record["held_out_texts"] == 12 and record["steps"] == 3 * 14
    assert record["after"]["loss"] < record["before"]["loss"] and record["after"]["masked_tokens"] > 0
    assert not (out(project) / "last.pt").exists() and not out(project).with_name("pretrained.partial").exists()
    assert folds.main(["--config", str(project)]) == 0
    assert train.main(["--config", str(project), "--fold", "0", "--quiet", "--set", "model.name_or_path=folds/pretrained",
                       "--set", "run.name=dapt"]) == 0
    assert (project.parent / "folds" / "dapt" / "fold_0" / "metrics.json").is_file()
    before = snapshot(project.parent)  # the same settings and texts again: nothing to do
    assert pretrain.main(["--config", str(project), *FAST]) == 0
    assert snapshot(project.parent) == before


def test_an_interrupted_pretraining_resumes_as_if_never_stopped(tmp_path, tiny_model, monkeypatch):
    tables = make_tables()
    reference = write_project(tmp_path / "reference", tiny_model, tables)
    stopped = write_project(tmp_path / "stopped", tiny_model, tables)
    assert pretrain.main(["--config", str(reference), *FAST]) == 0
    save, calls = torch.save, []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # stopped while writing the third checkpoint: it never lands, the second (step 8) does
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_stop)
    assert pretrain.main(["--config", str(stopped), *FAST]) == 130
    monkeypatch.setattr(torch, "save", save)
    assert not out(stopped).exists() and (out(stopped).with_name("pretrained.partial") / "last.pt").is_file()
    assert pretrain.main(["--config", str(stopped), *FAST]) == 0
    record = json.loads((out(stopped) / "pretrain.json").read_text())
    assert record["resumed_from_step"] == 8
    expected = json.loads((out(reference) / "pretrain.json").read_text())
    assert record["before"] == expected["before"] and abs(record["after"]["loss"] - expected["after"]["loss"]) < 1e-4
    got, want = load_file(out(stopped) / "model.safetensors"), load_file(out(reference) / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def test_pretrain_texts_table_and_bad_input(project, capsys):
    before = snapshot(project.parent)
    code = pretrain.main(["--config", str(project), "--set", "pretrain.texts=data/unlabeled.csv"])
    assert_user_error(code, capsys, "pretrain.texts file", "unlabeled.csv")
    pd.DataFrame({"title": ["a shop"], "other": ["x"]}).to_csv(project.parent / "data" / "bad.csv", index=False)
    before = snapshot(project.parent)
    code = pretrain.main(["--config", str(project), "--set", "pretrain.texts=data/bad.csv"])
    assert_user_error(code, capsys, "body")
    code = pretrain.main(["--config", str(project), "--set", "pretrain.mask_probability=0"])
    assert_user_error(code, capsys, "pretrain.mask_probability")
    assert snapshot(project.parent) == before

    texts = make_tables(n_train=40)["train.csv"][["title", "body"]]
    texts.to_csv(project.parent / "data" / "unlabeled.csv", index=False)
    assert pretrain.main(["--config", str(project), *FAST, "--set", "pretrain.texts=data/unlabeled.csv"]) == 0
    assert json.loads((out(project) / "pretrain.json").read_text())["texts"] == 40
    before = snapshot(project.parent)
    code = pretrain.main(["--config", str(project), *FAST])  # other texts, same folder
    assert_user_error(code, capsys, "exists", "--force")
    assert snapshot(project.parent) == before
    assert pretrain.main(["--config", str(project), *FAST, "--force"]) == 0
    assert json.loads((out(project) / "pretrain.json").read_text())["texts"] == 120


def test_a_broken_pretrain_checkpoint_is_one_line(project, capsys):
    partial = out(project).with_name("pretrained.partial")
    partial.mkdir(parents=True)
    (partial / "last.pt").write_bytes(b"\x80\x04garbage")
    code = pretrain.main(["--config", str(project), *FAST])
    assert_user_error(code, capsys, "last.pt", "unreadable", "delete it to start the pretraining over")
    assert not out(project).exists()


def test_a_chunked_text_pretrains_window_by_window(project):
    from rich.console import Console

    from comp import config
    from comp.nn.batching import WINDOW
    from comp.nn.model import load_tokenizer

    cfg = config.load(project, ["model.max_length=12", "model.chunks=3", "model.stride=2"])
    texts = ["north south east " * 12, "lovely"]
    seqs = pretrain.sequences(cfg, load_tokenizer(cfg.model, cfg.root), texts, Console(quiet=True))
    assert len(seqs) == 4 and all(len(s) <= 12 and not (s == WINDOW).any() for s in seqs)  # 3 windows + 1
