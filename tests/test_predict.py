"""comp.predict: any table with a finished run's folds, the same logits as training wrote, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from comp import export, folds, predict, submit, train
from comp.classical import text
from tests.conftest import assert_user_error, own_copy, snapshot, write_project


def cli(cfg, main, *args):
    return main(["--config", str(cfg), "--quiet", *args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The tiny project with an encoder run and a linear run, both finished and submitted."""
    cfg = write_project(tmp_path_factory.mktemp("predict"), tiny_model)
    assert folds.main(["--config", str(cfg)]) == 0
    assert cli(cfg, train.main, "--all") == 0
    assert cli(cfg, train.main, "--all", "--set", "model.kind=linear", "--set", "run.name=lin") == 0
    assert cli(cfg, submit.main) == 0
    return cfg


@pytest.mark.parametrize("run", ["tiny", "lin"])
def test_predicting_the_test_table_reproduces_training_and_submit(trained, tmp_path, run):
    cfg, data = trained, trained.parent / "data"
    out = tmp_path / "sub.csv"
    code = cli(cfg, predict.main, "--run", run, "--test", str(data / "test.csv"), "--out", str(out),
               "--sample", str(data / "sample_submission.csv"), "--save-logits", str(tmp_path / "logits"))
    assert code == 0
    for k in range(3):
        written = np.load(cfg.parent / "folds" / run / f"fold_{k}" / "test_logits.npy")
        assert np.allclose(np.load(tmp_path / "logits" / run / f"fold_{k}.npy"), written, atol=1e-5)
    if run == "tiny":  # the same file as comp.submit's: the sample's id order and columns
        assert pd.read_csv(out).equals(pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


def test_predict_takes_any_table_in_its_own_order_and_ignores_extra_columns(trained, tmp_path):
    cfg, data = trained, trained.parent / "data"
    table = pd.read_csv(data / "test.csv").iloc[::-1].head(7).assign(extra="x")
    table.to_csv(tmp_path / "hidden.csv", index=False)
    assert cli(cfg, predict.main, "--test", str(tmp_path / "hidden.csv"), "--out", str(tmp_path / "s.csv")) == 0
    sub = pd.read_csv(tmp_path / "s.csv")
    assert list(sub["id"]) == list(table["id"]) and list(sub.columns) == ["id", "label"]


BAD = {
    "missing column": (lambda t: t.drop(columns=["shop"]), ["'shop'"]),
    "no rows": (lambda t: t.iloc[:0], ["no rows"]),
    "non-numeric": (lambda t: t.assign(count=["x"] + list(t["count"].iloc[1:])), ["'count'", "non-numbers"]),
    "duplicate ids": (lambda t: pd.concat([t, t.iloc[:1]]), ["duplicate id"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tables_are_one_line_and_write_nothing(trained, tmp_path, capsys, case):
    edit, needles = BAD[case]
    edit(pd.read_csv(trained.parent / "data" / "test.csv")).to_csv(tmp_path / "t.csv", index=False)
    before = snapshot(tmp_path)
    code = cli(trained, predict.main, "--test", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv"))
    assert_user_error(code, capsys, *needles)
    assert snapshot(tmp_path) == before


def test_an_unfinished_run_is_refused(trained, tmp_path, capsys):
    code = cli(trained, predict.main, "--run", "nothing", "--test", str(trained.parent / "data" / "test.csv"),
               "--out", str(tmp_path / "s.csv"))
    assert_user_error(code, capsys, "run 'nothing'", "not finished")
    assert not (tmp_path / "s.csv").exists()


def exported(tmp_path, tiny_model, run_args=()):
    """A tiny project (with its own copy of the model) trained, submitted and exported; returns (config, bundle)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    cfg = write_project(tmp_path / "project", model)
    assert folds.main(["--config", str(cfg)]) == 0
    assert cli(cfg, train.main, "--all", *run_args) == 0
    assert cli(cfg, submit.main, *run_args) == 0
    assert cli(cfg, export.main, "--out", str(tmp_path / "bundle"), *run_args) == 0
    speeds = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["rows_per_second"]
    assert speeds["device"] == "cpu" and len(speeds["runs"]["tiny"]) == 3 and min(speeds["runs"]["tiny"]) > 0
    return cfg, tmp_path / "bundle"


def test_a_bundle_predicts_offline_what_submit_wrote_without_data_folds_model_or_pickle(tmp_path, tiny_model):
    cfg, bundle_dir = exported(tmp_path, tiny_model)
    root = cfg.parent
    shutil.copy(root / "data" / "test.csv", tmp_path / "hidden.csv")
    shutil.copy(root / "data" / "sample_submission.csv", tmp_path / "sample.csv")
    expected = pd.read_csv(root / "submissions" / "tiny.csv")
    for gone in (root / "data", root / "folds", tmp_path / "model"):
        shutil.rmtree(gone)
    for path in (p for p in bundle_dir.rglob("*") if p.is_file()):
        assert path.suffix not in (".pkl", ".joblib", ".pt", ".bin") and not path.read_bytes()[:1] == b"\x80"
    script = ("import sys; from comp import predict; code = predict.main(sys.argv[1:]); "
              "assert 'optuna' not in sys.modules and 'matplotlib' not in sys.modules, 'imported'; sys.exit(code)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, "--bundle", str(bundle_dir), "--test", str(tmp_path / "hidden.csv"),
                           "--sample", str(tmp_path / "sample.csv"), "--out", str(tmp_path / "sub.csv"), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(tmp_path / "sub.csv").equals(expected)


def test_an_existing_bundle_is_replaced_only_when_asked_and_only_once_the_new_one_is_whole(trained, tmp_path, capsys):
    out, other = tmp_path / "bundle", tmp_path / "notes"
    assert cli(trained, export.main, "--run", "lin", "--out", str(out)) == 0
    before = snapshot(out)
    assert_user_error(cli(trained, export.main, "--run", "tiny", "--out", str(out)), capsys, "already exists", "--replace")
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert_user_error(cli(trained, export.main, "--run", "tiny", "--out", str(other), "--replace"), capsys,
                      "not a bundle")
    assert snapshot(out) == before and (other / "mine.txt").read_text() == "keep"
    assert cli(trained, export.main, "--run", "tiny", "--out", str(out), "--replace") == 0
    members = json.loads((out / "manifest.json").read_text())["members"]
    assert [m["name"] for m in members] == ["tiny"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "notes"]  # no temporary folder is left


def test_a_bundled_linear_run_predicts_like_training(tmp_path, tiny_model):
    run = ("--set", "model.kind=linear")
    cfg, bundle_dir = exported(tmp_path, tiny_model, run)
    code = predict.main(["--bundle", str(bundle_dir), "--test", str(cfg.parent / "data" / "test.csv"), "--quiet",
                         "--out", str(tmp_path / "s.csv"), "--save-logits", str(tmp_path / "lg")])
    assert code == 0
    for k in range(3):
        written = np.load(cfg.parent / "folds" / "tiny" / f"fold_{k}" / "test_logits.npy")
        assert np.allclose(np.load(tmp_path / "lg" / "tiny" / f"fold_{k}.npy"), written, atol=1e-5)


def test_every_flipped_byte_and_an_unknown_format_are_refused_naming_the_file(tmp_path, tiny_model, capsys):
    cfg, bundle_dir = exported(tmp_path, tiny_model)
    test = cfg.parent / "data" / "test.csv"
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file())
    assert len(files) > 10
    for path in files:
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        code = predict.main(["--bundle", str(bundle_dir), "--test", str(test), "--out", str(tmp_path / "s.csv")])
        assert_user_error(code, capsys, path.name)
        path.write_bytes(original)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    code = predict.main(["--bundle", str(bundle_dir), "--test", str(test), "--out", str(tmp_path / "s.csv")])
    assert_user_error(code, capsys, "format 99")
    assert not (tmp_path / "s.csv").exists()


def test_estimate_projects_the_time_per_fold_and_writes_nothing(trained, capsys):
    before = snapshot(trained.parent)
    assert predict.main(["--config", str(trained), "--test", str(trained.parent / "data" / "test.csv"),
                         "--estimate", "10000"]) == 0
    out = capsys.readouterr().out
    assert out.count("rows/s") == 3 and "estimate for 10000 rows" in out
    assert snapshot(trained.parent) == before


def test_a_moved_project_keeps_its_folds_and_a_changed_input_is_refused(tmp_path, tiny_model, capsys):
    """Folds record what the tables and the model hold, not where they are: the project, its data and its model
    moved elsewhere still submit and predict the same; one changed training text or other weights are refused."""
    shutil.copytree(tiny_model, tmp_path / "model")
    cfg = write_project(tmp_path / "a", tmp_path / "model")
    assert folds.main(["--config", str(cfg)]) == 0 and cli(cfg, train.main, "--all") == 0
    assert cli(cfg, submit.main) == 0
    before = pd.read_csv(tmp_path / "a" / "submissions" / "tiny.csv")

    shutil.move(tmp_path / "a", tmp_path / "b")
    shutil.move(tmp_path / "b" / "data", tmp_path / "elsewhere")
    shutil.move(tmp_path / "model", tmp_path / "moved-model")
    cfg = tmp_path / "b" / "comp.toml"
    text = cfg.read_text().replace('"data/', f'"{(tmp_path / "elsewhere").as_posix()}/')
    cfg.write_text(text.replace((tmp_path / "model").as_posix(), (tmp_path / "moved-model").as_posix()))
    assert cli(cfg, submit.main) == 0
    assert pd.read_csv(tmp_path / "b" / "submissions" / "tiny.csv").equals(before)
    test = tmp_path / "elsewhere" / "test.csv"
    assert cli(cfg, predict.main, "--test", str(test), "--out", str(tmp_path / "p.csv"),
               "--sample", str(tmp_path / "elsewhere" / "sample_submission.csv")) == 0
    assert pd.read_csv(tmp_path / "p.csv").equals(before)
    capsys.readouterr()

    train_csv = tmp_path / "elsewhere" / "train.csv"
    original = pd.read_csv(train_csv)
    original.assign(body=["changed words"] + list(original["body"].iloc[1:])).to_csv(train_csv, index=False)
    assert_user_error(cli(cfg, submit.main), capsys, "training table", "changed")
    assert_user_error(cli(cfg, train.main, "--all"), capsys, "already trained", "--force")
    original.to_csv(train_csv, index=False)

    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "moved-model").apply(lambda m: m.reset_parameters()
                                                             if hasattr(m, "reset_parameters") else None
                                                             ).save_pretrained(tmp_path / "moved-model")
    code = cli(cfg, predict.main, "--test", str(test), "--out", str(tmp_path / "q.csv"))
    assert_user_error(code, capsys, "does not hold the model")
    assert not (tmp_path / "q.csv").exists()


def test_folds_trained_before_content_records_stay_valid(trained, tmp_path):
    """Older folds recorded a hash of the settings with the path strings, and no content: they still submit."""
    from comp import config

    cfg_path = own_copy(trained, tmp_path)
    cfg = config.load(cfg_path)
    for k in range(3):
        path = cfg_path.parent / "folds" / "tiny" / f"fold_{k}" / "metrics.json"
        record = json.loads(path.read_text())
        assert record.pop("content")["model"]
        path.write_text(json.dumps({**record, "config_hash": cfg.hash(paths=True)}))
    assert cli(cfg_path, submit.main) == 0
    path.write_text(json.dumps({**record, "config_hash": cfg.hash()}))  # the new hash without content: stale
    assert cli(cfg_path, submit.main) == 2


def test_a_head_tail_run_predicts_what_it_trained_with(tmp_path, tiny_model):
    """model.truncation reaches every place that tokenizes: training and comp.predict cut long texts alike."""
    cfg = write_project(tmp_path, tiny_model)
    over = ["--set", "model.truncation=head_tail", "--set", "model.max_length=12", "--set", "model.head_tokens=4"]
    assert folds.main(["--config", str(cfg)]) == 0 and cli(cfg, train.main, "--all", *over) == 0
    data = cfg.parent / "data"
    assert cli(cfg, predict.main, *over, "--test", str(data / "test.csv"), "--out", str(tmp_path / "s.csv"),
               "--save-logits", str(tmp_path / "logits")) == 0
    for k in range(3):
        written = np.load(cfg.parent / "folds" / "tiny" / f"fold_{k}" / "test_logits.npy")
        assert np.allclose(np.load(tmp_path / "logits" / "tiny" / f"fold_{k}.npy"), written, atol=1e-5)


def test_a_run_trained_in_bf16_is_bundled_with_bf16_encoder_weights_and_predicts_within_tolerance(tmp_path, tiny_model):
    from safetensors.torch import load_file

    run = ("--set", "train.precision=bf16")
    cfg, bundle_dir = exported(tmp_path, tiny_model, run)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["members"][0]["encoder_weights"] == "bfloat16"
    weights = load_file(str(bundle_dir / "runs" / "tiny" / "fold_0" / "model.safetensors"))
    trained = load_file(str(cfg.parent / "folds" / "tiny" / "fold_0" / "model.safetensors"))
    assert {str(v.dtype) for k, v in weights.items() if k.startswith("encoder.")} == {"torch.bfloat16"}
    assert all(v.dtype == trained[k].dtype for k, v in weights.items() if not k.startswith("encoder."))
    args = ["--test", str(cfg.parent / "data" / "test.csv"), "--quiet"]
    assert predict.main(["--bundle", str(bundle_dir), *args, "--out", str(tmp_path / "b.csv"),
                         "--save-logits", str(tmp_path / "b")]) == 0
    assert predict.main(["--config", str(cfg), *run, *args, "--out", str(tmp_path / "r.csv"),
                         "--save-logits", str(tmp_path / "r")]) == 0
    for k in range(3):
        b, r = (np.load(tmp_path / d / "tiny" / f"fold_{k}.npy") for d in ("b", "r"))
        p, q = (np.exp(x) / np.exp(x).sum(1, keepdims=True) for x in (b, r))
        assert np.abs(p - q).max() < 0.02


def test_predict_tokenizes_the_table_once_per_run(trained, tmp_path, monkeypatch):
    calls = []
    real = predict.tokenize
    monkeypatch.setattr(predict, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli(trained, predict.main, "--test", str(trained.parent / "data" / "test.csv"),
               "--out", str(tmp_path / "p.csv")) == 0
    assert len(calls) == 1  # three folds, one tokenization


@pytest.mark.parametrize("name", ["decision.json", "blend.json"])
def test_an_altered_decision_or_blend_record_is_refused(trained, tmp_path, capsys, name):
    from comp import blend

    cfg = own_copy(trained, tmp_path)
    if name == "decision.json":
        assert cli(cfg, submit.main, "--decide") == 0
        path, command = cfg.parent / "folds" / "tiny" / name, ["--test", str(cfg.parent / "data" / "test.csv"),
                                                                 "--out", str(tmp_path / "p.csv")]
        main = predict.main
    else:
        assert cli(cfg, blend.main, "--runs", "tiny,lin", "--name", "both") == 0
        path, command, main = cfg.parent / "folds" / "both" / name, ["--blend", "both", "--out", str(tmp_path / "b")], \
            export.main
    record = json.loads(path.read_text())
    assert record["check"]
    key = "weights"
    record[key] = [w * 0.5 for w in record[key]]
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert_user_error(main(["--config", str(cfg), *command]), capsys, name, "altered")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "b").exists()


def test_a_blend_bundle_feeds_each_member_its_own_text_and_predicts_the_blends_file(trained, tmp_path):
    """Members that read other text columns, separators and a template: the bundle predicts what comp.blend wrote,
    each fold's logits bit for bit (fp32)."""
    from comp import blend

    cfg, linear = own_copy(trained, tmp_path), ("--set", "model.kind=linear")
    runs = {"tpl": ("--set", "data.text=['body']", "--set", "data.template='title {shop} north {text} east'"),
            "lin-t": (*linear, "--set", "data.text=['title']", "--set", "data.allow_empty_text=true"),
            "lin-sep": (*linear, "--set", "data.text=['body', 'title']", "--set", "data.text_separator=' south '")}
    for name, sets in runs.items():
        assert cli(cfg, train.main, "--all", "--set", f"run.name={name}", *sets) == 0
    assert cli(cfg, blend.main, "--runs", "tiny,lin,tpl,lin-t,lin-sep", "--weights", "equal", "--name", "mix") == 0
    assert cli(cfg, export.main, "--blend", "mix", "--out", str(tmp_path / "b")) == 0
    data = cfg.parent / "data"
    assert predict.main(["--bundle", str(tmp_path / "b"), "--test", str(data / "test.csv"), "--quiet", "--sample",
                         str(data / "sample_submission.csv"), "--out", str(tmp_path / "p.csv"),
                         "--save-logits", str(tmp_path / "lg")]) == 0
    for name in ("tiny", "lin", *runs):
        for k in range(3):
            written = np.load(cfg.parent / "folds" / name / f"fold_{k}" / "test_logits.npy")
            assert np.array_equal(np.load(tmp_path / "lg" / name / f"fold_{k}.npy"), written), (name, k)
    assert pd.read_csv(tmp_path / "p.csv").equals(pd.read_csv(cfg.parent / "submissions" / "mix.csv"))


def test_a_model_fingerprint_reads_every_byte_once_and_folds_with_sampled_ones_stay_valid(trained, tmp_path,
                                                                                         monkeypatch, capsys):
    """A changed layer between the sampled blocks of a large weight file kept the old fingerprint; every byte is
    hashed now, once per (path, size, modification time). Folds that recorded a sampled fingerprint still submit,
    compared in their own scheme."""
    from comp import config
    from comp.tables import identity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "big"
    folder.mkdir()
    weights = folder / "model.safetensors"
    data = bytearray(np.random.default_rng(0).bytes(16 << 20))
    weights.write_bytes(bytes(data))
    full, sampled = identity.folder_digest(folder), identity.folder_digest(folder, full=False)
    step = (len(data) - identity.BLOCK) // (identity.BLOCKS - 1)
    data[step // 2 + identity.BLOCK] ^= 1  # a byte between two sampled blocks, the size unchanged
    weights.write_bytes(bytes(data))
    assert identity.folder_digest(folder, full=False) == sampled  # what the sample missed
    assert identity.folder_digest(folder) != full and identity.folder_digest(folder).startswith(identity.FULL)
    cache = json.loads(identity.digest_cache().read_text())
    assert [str(weights.resolve())] == list({key.split("|")[0] for key in cache})
    key = next(k for k in cache if k.endswith(f"|{weights.stat().st_mtime_ns}"))
    identity.digest_cache().write_text(json.dumps({key: "planted"}))
    assert identity.file_digest(weights) == "planted"  # read from the cache, not from the file again

    cfg_path = own_copy(trained, tmp_path)
    cfg = config.load(cfg_path)
    for k in range(3):  # what folds trained before whole-file fingerprints recorded
        path = cfg_path.parent / "folds" / "tiny" / f"fold_{k}" / "metrics.json"
        record = json.loads(path.read_text())
        assert record["content"]["model"].startswith(identity.FULL)
        record["content"]["model"] = identity.model_digest(cfg, full=False)
        path.write_text(json.dumps(record))
    assert cli(cfg_path, submit.main) == 0
    record["content"]["model"] = "0123456789abcdef"  # another model, in the sampled scheme
    path.write_text(json.dumps(record))
    assert_user_error(cli(cfg_path, submit.main), capsys, "the model's files")


@pytest.mark.parametrize("run", ["tiny", "lin"])
def test_chunked_prediction_writes_the_file_of_one_pass(trained, tmp_path, run, monkeypatch):
    """--chunk-rows: a large table's tokens and features are made a chunk at a time; the file is the same."""
    data, real, real_counts, seen, counted = trained.parent / "data", predict.tokenize, text._counts, {}, {}
    for chunk in (1000, 7):
        seen[chunk], counted[chunk] = [], []
        monkeypatch.setattr(predict, "tokenize", lambda tok, texts, *a, c=chunk: seen[c].append(len(texts))
                            or real(tok, texts, *a))
        monkeypatch.setattr(text, "_counts", lambda kw, texts, c=chunk: counted[c].append(len(texts))
                            or real_counts(kw, texts))
        assert cli(trained, predict.main, "--run", run, "--test", str(data / "test.csv"),
                   "--out", str(tmp_path / f"{chunk}.csv"), "--sample", str(data / "sample_submission.csv"),
                   "--chunk-rows", str(chunk), "--save-logits", str(tmp_path / str(chunk))) == 0
    if run == "tiny":  # one chunk: tokenized once for the run's folds; chunks of 7: never more than 7 rows at once
        assert seen[1000] == [30] and max(seen[7]) == 7 and sum(seen[7]) == 3 * 30
    else:  # a chunk's n-grams are counted once for the run's three folds (two vectorizers: words, characters)
        assert sum(counted[1000]) == sum(counted[7]) == 2 * 30 and max(counted[7]) == 7
    for k in range(3):
        one, chunked = (np.load(tmp_path / str(c) / run / f"fold_{k}.npy") for c in (1000, 7))
        assert np.allclose(one, chunked, atol=1e-5)
    assert pd.read_csv(tmp_path / "7.csv").equals(pd.read_csv(tmp_path / "1000.csv"))
