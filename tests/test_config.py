import json
import shutil
import tomllib
from pathlib import Path

import pytest

from comp import config
from comp.errors import CompError
from tests.conftest import write_project


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    cfg = config.load(write(tmp_path, "[train]\nepochs = 4\n"),
                      ["train.encoder_lr=2e-5", "model.pooling=mean", "model.head_hidden=[8, 4]", "data.text=body",
                       "data.train_rows=0"])
    assert cfg.train.epochs == 4 and cfg.train.encoder_lr == 2e-5
    assert cfg.model.pooling == "mean" and cfg.model.head_hidden == (8, 4)
    assert cfg.data.text == ("body",) and cfg.data.train_rows == 0
    assert config.ModelConfig().head_hidden == (512, 64)
    assert cfg.root == tmp_path.resolve()


def test_int_accepted_for_float(tmp_path):
    assert config.load(write(tmp_path, "[model]\ndropout = 0\n")).model.dropout == 0.0


@pytest.mark.parametrize("text, needle", [
    ("[train]\nepochz = 3\n", "train.epochz"),
    ("[trian]\nepochs = 3\n", "[trian]"),
    ("[train]\nepochs = '3'\n", "train.epochs"),
    ("[train]\nepochs = true\n", "train.epochs"),
    ("[model]\npooling = 'max'\n", "model.pooling"),
    ("[train]\nmonitor = 'val_auc'\n", "train.monitor"),
    ("[folds]\nn_splits = 1\n", "folds.n_splits"),
    ("[data]\ntext = []\n", "data.text"),
    ("[data]\nnumeric = ['id']\n", "more than one role"),
    ("[train\n", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, needle):
    with pytest.raises(CompError) as exc:
        config.load(write(tmp_path, text))
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("item, needle", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.nope=1", "train.nope"),
    ("epochs=3", "section.key=value"),
])
def test_bad_override(tmp_path, item, needle):
    with pytest.raises(CompError) as exc:
        config.load(write(tmp_path, ""), [item])
    assert needle in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(CompError, match="not found"):
        config.load(tmp_path / "absent.toml")


def test_hash_tracks_what_changes_learning(tmp_path):
    base = config.load(write(tmp_path, ""))
    assert base.hash() == config.load(write(tmp_path, ""), ["train.eval_batch_size=7"]).hash()
    assert base.hash() == config.load(write(tmp_path, ""), ["data.solution='x.csv'"]).hash()
    assert base.hash() != config.load(write(tmp_path, ""), ["train.encoder_lr=1e-5"]).hash()
    assert base.hash() != config.load(write(tmp_path, ""), ["model.pooling=cls"]).hash()
    # keys added later enter the hash only away from their defaults (folds trained before them stay valid)
    assert base.hash() == config.load(write(tmp_path, ""), ["train.loss=auto", "model.msd_samples=1"]).hash()
    for key, default in [(f"{sec}.{k}", v) for sec, keys in config.LATER.items() for k, v in keys.items()]:
        other = {str: "'x'", float: "0.5", int: "2", type(None): "0.5", list: "['x', 'y']", bool: "true"}[type(default)]
        if key in ("train.pseudo_threshold", "train.swa_epochs", "model.quantize"):
            continue  # only meaningful with a teacher, with weight averaging, with adapters (below)
        value = {"model.fusion": "gated", "train.loss": "focal", "model.kind": "linear",
                 "model.numeric_transform": "standard", "model.wide": "zero", "model.truncation": "tail",
                 "folds.group": "author", "data.task": "regression", "train.optimizer": "adamw_8bit",
                 "model.chunk_pooling": "max", "model.stride": "4", "train.swa": "last", "model.text_norm": "off",
                 "train.awp_params": "encoder", "train.device": "cpu", "data.template": "'{text}!'"}.get(key, other)
        assert base.hash() != config.load(write(tmp_path, ""), [f"{key}={value}"]).hash(), key
    assert base.hash() == config.load(write(tmp_path, ""), ["train.swa_epochs=2"]).hash()  # no averaging, no count
    assert base.hash() == config.load(write(tmp_path, ""), ["model.lora.alpha=4"]).hash()  # no adapters (r = 0)
    lora = config.load(write(tmp_path, ""), ["model.lora.r=4"]).hash()
    assert lora != base.hash() and lora != config.load(write(tmp_path, ""), ["model.lora.r=4", "model.quantize=4bit"]).hash()
    swa = ["train.swa=last", "train.epochs=5"]
    assert config.load(write(tmp_path, ""), swa).hash() != config.load(write(tmp_path, ""), [*swa, "train.swa_epochs=5"]).hash()


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, ""), ["train.epochs=5", "data.categorical=['a', 'b']"])
    again = config.load(write(tmp_path, config.to_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_every_shipped_demo_config_is_valid():
    root = Path(__file__).resolve().parents[1]
    shipped = sorted(p for p in root.glob("*.toml") if p.name != "pyproject.toml")
    assert {"comp.toml", "loans.toml", "movies.toml", "bbc.toml"} <= {p.name for p in shipped}
    for path in shipped:
        cfg = config.load(path)
        assert cfg.data.train.startswith("data/") and cfg.folds_path.parent.is_relative_to(root / "folds"), path.name


def test_auto_loss_follows_the_metric_and_hashes_as_what_it_resolved_to(tmp_path):
    path = write(tmp_path, "")
    resolved = {("single_label", "macro_f1"): "balanced_ce", ("single_label", "accuracy"): "ce",
                ("single_label", "log_loss"): "ce", ("single_label", "roc_auc"): "ce", ("single_label", "qwk"): "ce",
                ("multi_label", "macro_f1"): "balanced_ce", ("multi_label", "roc_auc"): "ce",
                ("regression", "rmse"): "mse"}
    for (task, metric), loss in resolved.items():
        cfg = config.load(path, [f"data.task={task}", f"data.metric={metric}"])
        assert cfg.train.loss == loss, (task, metric)
        assert cfg.hash() == config.load(path, [f"data.task={task}", f"data.metric={metric}", f"train.loss={loss}"]).hash()
        assert f'loss = "{loss}"' in config.to_toml(cfg)  # a fold's config.toml keeps what auto resolved to


def test_tfidf_settings_validate_and_enter_only_a_classical_runs_hash(tmp_path):
    path = write(tmp_path, "")
    linear = config.load(path, ["model.kind=linear"])
    assert linear.model.tfidf.C == "auto" and linear.model.tfidf.analyzer == "auto"
    assert config.load(path, ["model.kind=linear", "model.tfidf.C=4"]).hash() != linear.hash()
    assert config.load(path, ["model.tfidf.C=4"]).hash() == config.load(path).hash()  # an encoder run ignores it
    for bad, needle in (("model.tfidf.C=0", "model.tfidf.C"), ("model.tfidf.analyzer=words", "analyzer"),
                        ("model.tfidf.char_ngrams=[3, 1]", "char_ngrams"), ("model.tfidf.nope=1", "model.tfidf.nope")):
        with pytest.raises(CompError, match=needle):
            config.load(path, ["model.kind=linear", bad])
    text = config.to_toml(config.load(path, ["model.kind=linear", "model.tfidf.C=4"]))
    assert "tfidf = {" in text and "C = 4.0" in text


def test_auto_pooling_is_what_a_sentence_transformers_folder_declares(tmp_path, tiny_model):
    declared = tmp_path / "declared"
    shutil.copytree(tiny_model, declared)
    (declared / "1_Pooling").mkdir()
    (declared / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False,
                                                                   "pooling_mode_mean_tokens": True}))
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (declared / "modules.json").write_text(json.dumps(modules))
    auto = ["model.pooling=auto"]
    assert config.load(write_project(tmp_path / "a", declared), auto).model.pooling == "mean"
    assert config.load(write_project(tmp_path / "b", tiny_model), auto).model.pooling == "cls"  # nothing declared
    (declared / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    assert config.load(write_project(tmp_path / "c", declared), auto).model.pooling == "cls"  # a mode comp lacks


def test_a_fold_config_from_before_text_norm_reads_as_the_raw_vector_it_trained_on(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    raw = tomllib.loads(config.to_toml(cfg))
    assert config.from_dict(config.as_recorded(raw)).model.text_norm == "fitted"  # recorded: kept
    del raw["model"]["text_norm"]
    old = config.from_dict(config.as_recorded(raw))
    assert old.model.text_norm == "off" and old.hash() != cfg.hash()
    assert old.hash() == config.load(write(tmp_path, ""), ["model.text_norm=off"]).hash()
