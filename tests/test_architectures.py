"""Every encoder family competitors pick, as tiny random models built offline from their config classes with the
fixture's tokenizer: each trains a fold, resumes after being stopped mid-epoch exactly where an uninterrupted
run goes, and predicts what submit wrote. Position limits come from each architecture."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from comp import folds, predict, submit, train
from comp.config import ModelConfig
from comp.errors import CompError
from comp.nn import batching, model, state
from comp.tables.read import PAIR
from tests.conftest import assert_user_error, fold0_oof, make_tables, snapshot, tokenizer_variant, write_project

SMALL = {"vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 37, "pad_token_id": 0}
ARCHS = {  # the fixture tokenizer's ids: [PAD] 0, [CLS] 2, [SEP] 3
    "bert": lambda: T.BertConfig(**SMALL, max_position_embeddings=64),
    "roberta": lambda: T.RobertaConfig(**SMALL, max_position_embeddings=65),  # 64 positions after padding_idx + 1
    "xlm-roberta": lambda: T.XLMRobertaConfig(**SMALL, max_position_embeddings=65),
    "deberta-v2": lambda: T.DebertaV2Config(**SMALL, max_position_embeddings=64, relative_attention=True,
                                            position_biased_input=False, pos_att_type=["p2c", "c2p"],
                                            position_buckets=16),
    "electra": lambda: T.ElectraConfig(**SMALL, max_position_embeddings=64, embedding_size=32),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                             pad_token_id=0, max_position_embeddings=64),
}
DECODERS = {  # decoder LLM families, read through their last real token (model.pooling = "auto")
    "qwen2": lambda: T.Qwen2Config(**SMALL, num_key_value_heads=2, max_position_embeddings=64),
    "qwen3": lambda: T.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "gemma2": lambda: T.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "llama": lambda: T.LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: T.MistralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64),
    "phi3": lambda: T.Phi3Config(**SMALL, max_position_embeddings=64),
}
ARCHS.update(DECODERS)
if hasattr(T, "ModernBertConfig"):
    ARCHS["modernbert"] = lambda: T.ModernBertConfig(**SMALL, max_position_embeddings=64, global_attn_every_n_layers=1,
                                                     bos_token_id=2, cls_token_id=2, eos_token_id=3, sep_token_id=3)
LIMITS = {"bert": 64, "roberta": 64, "xlm-roberta": 64, "deberta-v2": None, "electra": 64, "distilbert": 64,
          "modernbert": 64, **dict.fromkeys(DECODERS, 64)}
RUN = ["--quiet", "--set", "model.pooling=auto", "--set", "folds.n_splits=2", "--set", "train.epochs=2",
       "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2", "--set", "train.patience=2",
       "--set", "model.max_length=48"]


class Stopped(BaseException):
    """A stop in the middle of an epoch, right after a checkpoint was written (what a kill leaves behind)."""


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp(request.param)
    for f in tiny_model.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    T.AutoModel.from_config(ARCHS[request.param]()).save_pretrained(out)
    return request.param, out


def test_each_architecture_trains_resumes_and_predicts(arch, tmp_path, monkeypatch):
    """Decoders train through LoRA adapters: their folds hold the adapters and the head, no base weight."""
    name, path = arch
    run = [*RUN, "--set", "model.lora.r=4"] if name in DECODERS else RUN
    tables = make_tables(n_train=48, n_test=10)
    reference, cfg = write_project(tmp_path / "ref", path, tables), write_project(tmp_path / "run", path, tables)
    for c in (reference, cfg):
        assert folds.main(["--config", str(c), *run]) == 0
    assert train.main(["--config", str(reference), "--fold", "0", *run]) == 0

    save = state.Checkpoint.save

    def save_then_stop(self, st):
        save(self, st)
        raise Stopped

    monkeypatch.setattr(state.Checkpoint, "save", save_then_stop)
    with pytest.raises(Stopped):
        train.main(["--config", str(cfg), "--fold", "0", *run])
    monkeypatch.undo()
    fold0 = cfg.parent / "folds" / "tiny" / "fold_0"
    assert (fold0 / "last.pt").exists() and not (fold0 / "metrics.json").exists()
    assert train.main(["--config", str(cfg), "--fold", "0", *run]) == 0
    assert json.loads((fold0 / "metrics.json").read_text())["resumed_from"] is not None
    expected = np.load(reference.parent / "folds" / "tiny" / "fold_0" / "oof_logits.npy")
    assert np.allclose(np.load(fold0 / "oof_logits.npy"), expected, atol=1e-5), name
    if name in DECODERS:  # no tensor of the base: every encoder tensor is an adapter, smaller than the base's
        base = load_file(str(path / "model.safetensors"))
        saved = [k for k in load_file(str(fold0 / "model.safetensors")) if k.startswith("encoder.")]
        assert saved and all("lora_" in k for k in saved) and not {k.removeprefix("encoder.") for k in saved} & set(base)

    assert train.main(["--config", str(cfg), "--fold", "1", *run]) == 0 and submit.main(["--config", str(cfg), *run]) == 0
    data = cfg.parent / "data"
    assert predict.main(["--config", str(cfg), *run, "--test", str(data / "test.csv"), "--out", str(tmp_path / "p.csv"),
                         "--sample", str(data / "sample_submission.csv")]) == 0
    assert pd.read_csv(tmp_path / "p.csv").equals(pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


def test_position_limits_follow_the_architecture(arch):
    """Absolute positions less their padding offset (RoBERTa and XLM-R keep two), none for relative ones."""
    name, path = arch
    encoder = model.load_encoder(ModelConfig(name_or_path=str(path)))
    assert model.position_limit(encoder.config) == LIMITS[name]
    if LIMITS[name] is None:
        model.build_model(ModelConfig(name_or_path=str(path), max_length=1024), 0, 3)  # no cap
    else:
        with pytest.raises(CompError, match=f"supports at most {LIMITS[name]}"):
            model.build_model(ModelConfig(name_or_path=str(path), max_length=LIMITS[name] + 1), 0, 3)


def test_a_left_padding_tokenizer_trains_like_a_right_padding_one(tiny_model, tmp_path):
    """comp pads batches itself (on the right, with the mask), so the tokenizer's padding side changes nothing."""
    left = tokenizer_variant(tiny_model, tmp_path / "model", lambda s: s.update(padding_side="left"))
    tables = make_tables(n_train=48, n_test=10)
    logits = [fold0_oof(tmp_path / name, path, tables, RUN) for name, path in (("right", tiny_model), ("left", left))]
    assert np.allclose(logits[0], logits[1], atol=1e-6)


@pytest.mark.parametrize("pad", [None, "[SEP]"])
def test_a_tokenizer_without_a_padding_token_or_padding_with_its_end_token_trains_alike(tiny_model, tmp_path, pad):
    """No padding token (Llama-3), or padding with the end-of-text token (SmolLM2, Qwen base): batches are padded
    with another id, and since masks come from row lengths the fold learns exactly what it does with [PAD]."""
    variant = tokenizer_variant(tiny_model, tmp_path / "model", lambda s: s.update(pad_token=pad, eos_token="[SEP]"))
    tok = model.load_tokenizer(ModelConfig(name_or_path=str(variant)))
    assert tok.pad_token_id in (None, tok.eos_token_id) and model.pad_id(tok) not in (None, tok.eos_token_id)
    tables = make_tables(n_train=48, n_test=10)
    logits = [fold0_oof(tmp_path / name, path, tables, RUN) for name, path in (("pad", tiny_model), ("variant", variant))]
    assert np.allclose(logits[0], logits[1], atol=1e-5)


def test_text_pairs_use_the_pair_encoding_and_mark_their_sides(arch):
    """A pair row is the tokenizer's own pair encoding (the longer side cut first); where the encoder has token
    types, the second side is type 1 exactly as the tokenizer marks it; every family runs it."""
    name, path = arch
    tok = model.load_tokenizer(ModelConfig(name_or_path=str(path)))
    a, b = "the dress fits and the fabric color was very plain", "lovely"
    ids = batching.tokenize(tok, [a + PAIR + b, "awful" + PAIR + "fine okay"], 64)
    expected = tok([a, "awful"], [b, "fine okay"])
    assert [x.tolist() for x in ids] == expected["input_ids"]
    cut = batching.tokenize(tok, [a + PAIR + b], 9)[0].tolist()
    assert cut == tok(a, b, truncation="longest_first", max_length=9)["input_ids"]
    assert cut.index(tok.sep_token_id) < len(cut) - 2  # the short side kept: the longer one was cut
    m = model.build_model(ModelConfig(name_or_path=str(path), max_length=48, head_hidden=(8,)), 0, 3,
                          pair_sep=tok.sep_token_id).eval()
    assert (m.pair_sep is not None) == ((getattr(m.encoder.config, "type_vocab_size", 0) or 0) >= 2), name
    if m.pair_sep is not None:
        assert m.token_types(torch.tensor(expected["input_ids"][:1])).tolist() == expected["token_type_ids"][:1]
    batch = batching.collate(batching.Rows(ids, np.zeros((2, 0), np.float32)), np.arange(2), tok.pad_token_id,
                             torch.device("cpu"))
    with torch.no_grad():
        assert m(*batch).shape == (2, 3)


def test_a_text_pair_run_trains_and_predicts_what_submit_wrote(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model)
    pair = ["--quiet", "--set", "data.text_pair=['title', 'body']"]
    assert folds.main(["--config", str(cfg), *pair]) == 0
    assert train.main(["--config", str(cfg), "--all", *pair]) == 0 and submit.main(["--config", str(cfg), *pair]) == 0
    out = tmp_path / "p.csv"
    data = cfg.parent / "data"
    assert predict.main(["--config", str(cfg), "--test", str(data / "test.csv"), "--out", str(out),
                         "--sample", str(data / "sample_submission.csv"), *pair]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


@pytest.mark.parametrize("sets, needle", [
    (["data.text_pair=['title']"], "data.text_pair names 1 column(s): it takes two"),
    (["data.text_pair=['title', 'body', 'shop']"], "names 3 column(s)"),
    (["data.text_pair=['title', 'body']", "model.truncation=tail"], "a text pair (data.text_pair) is cut"),
])
def test_text_pair_config_errors_are_one_line(project, capsys, sets, needle):
    before = snapshot(project.parent)
    assert_user_error(folds.main(["--config", str(project), *(a for s in sets for a in ("--set", s))]), capsys, needle)
    assert snapshot(project.parent) == before


def test_a_packed_batch_gives_each_row_the_logits_of_the_padded_batch(arch):
    """train.packing: the rows end to end, no padding, positions restarting, a block-diagonal mask (causal in a
    decoder) standing in on the CPU for FlashAttention-2's variable-length kernel."""
    from comp.config import TrainConfig
    from comp.nn import packing
    name, path = arch
    pooling = "last" if name in DECODERS else "cls"
    built = model.build_model(ModelConfig(name_or_path=str(path), pooling=pooling, max_length=48, head_hidden=(8,)),
                              2, 3, tcfg=TrainConfig(packing="on", device="cpu"))
    if not built.packs:  # a family whose encoder takes no position_ids keeps its padded batches
        assert name in packing.UNPACKED
        return
    built.eval()
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[2], rng.integers(5, 200, n), [3]]) for n in (3, 17, 9, 30)]
    rows = batching.Rows(seqs, rng.normal(size=(4, 2)).astype(np.float32), np.zeros(4, np.int64))
    index = np.arange(4)
    with torch.no_grad():
        padded = built(*batching.collate(rows, index, 0, torch.device("cpu")))
        packed = built(*batching.batch_maker(rows, 0, torch.device("cpu"), packed=True)(index))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)


WINDOWED = {  # a sliding window of 8 tokens: on every layer (Mistral), every other layer (Gemma-2, ModernBERT)
    "mistral": lambda: T.MistralConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=8),
    "gemma2": lambda: T.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                     sliding_window=8),
}
if hasattr(T, "ModernBertConfig"):
    WINDOWED["modernbert"] = lambda: T.ModernBertConfig(**SMALL, max_position_embeddings=64, global_attn_every_n_layers=2,
                                                        local_attention=16, bos_token_id=2, cls_token_id=2,
                                                        eos_token_id=3, sep_token_id=3)


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_packing_keeps_a_sliding_window_or_is_refused_in_one_line(name, tmp_path, tiny_model, capsys):
    """The block-diagonal mask of a packed batch has no window: packing = "on" is refused where the window is shorter
    than max_length, and where it is not (max_length <= window) packed and padded logits agree."""
    from comp.config import TrainConfig
    from comp.nn import packing

    path = tmp_path / name
    shutil.copytree(tiny_model, path)
    T.AutoModel.from_config(WINDOWED[name]()).save_pretrained(path)
    pooling = "cls" if name == "modernbert" else "last"
    built = model.build_model(ModelConfig(name_or_path=str(path), pooling=pooling, max_length=48),
                              2, 3, tcfg=TrainConfig(packing="off", device="cpu"))
    assert packing.attention_window(built.encoder.config) == 8
    with pytest.raises(CompError, match="sliding window of 8 tokens, shorter than model.max_length = 48"):
        model.build_model(ModelConfig(name_or_path=str(path), pooling=pooling, max_length=48),
                          2, 3, tcfg=TrainConfig(packing="on", device="cpu"))
    cfg = write_project(tmp_path / "p", path)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    before = snapshot(cfg.parent)
    capsys.readouterr()
    code = train.main(["--config", str(cfg), "--fold", "0", *RUN, "--set", "train.packing=on"])
    assert_user_error(code, capsys, "train.packing", "sliding window of 8")
    assert snapshot(cfg.parent) == before
    short = model.build_model(ModelConfig(name_or_path=str(path), pooling=pooling, max_length=8, head_hidden=(8,)),
                              2, 3, tcfg=TrainConfig(packing="on", device="cpu"))
    assert short.packs
    short.eval()
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[2], rng.integers(5, 200, n), [3]]) for n in (3, 6, 1, 5)]  # rows within the window
    rows = batching.Rows(seqs, rng.normal(size=(4, 2)).astype(np.float32), np.zeros(4, np.int64))
    with torch.no_grad():
        padded = short(*batching.collate(rows, np.arange(4), 0, torch.device("cpu")))
        packed = short(*batching.batch_maker(rows, 0, torch.device("cpu"), packed=True)(np.arange(4)))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
