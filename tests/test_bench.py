"""The benchmark runs all three loops on the tiny model and reports consistent figures (no speed targets here)."""

import json

from comp import bench, folds
from tests.conftest import make_tables, write_project


def test_bench_reports_every_loop(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=60, n_test=6))
    assert folds.main(["--config", str(cfg)]) == 0
    out = tmp_path / "bench.json"
    assert bench.main(["--config", str(cfg), "--samples", "16", "--quality-rows", "12", "--quality-epochs", "1",
                       "--rounds", "2", "--quality-seeds", "2", "--out", str(out), "--set", "train.batch_size=4"]) == 0
    r = json.loads(out.read_text())
    for loop in ("seed_loop", "comp", "trainer"):
        s = r[loop]
        assert s["samples_per_s"] > 0 and s["peak_rss_mb"] > 0
        assert 0 < s["useful_tokens_per_s"] / s["samples_per_s"] <= 48  # real tokens only, never the 512 padding
        q = r["quality"][loop]
        assert len(q["per_seed"]) == 2 and abs(q["macro_f1"] - sum(q["per_seed"]) / 2) < 1e-12
        assert all(0.0 <= f1 <= 1.0 for f1 in q["per_seed"])
    assert r["ratios"]["comp_over_seed"] == r["comp"]["samples_per_s"] / r["seed_loop"]["samples_per_s"]
    assert r["matmul_tflops"]["fp32"] > 0 and r["matmul_tflops"]["bf16"] > 0
    assert 0 < r["comp_mfu"] and r["encoder_flop_params"] > 0
    assert r["quality"]["train_rows"] == r["quality"]["val_rows"] == 12
    for loop in ("comp", "trainer"):  # timed in rounds; the kept figure is one of them
        assert len(r[loop]["rounds_samples_per_s"]) == 2
        assert round(r[loop]["samples_per_s"], 2) in r[loop]["rounds_samples_per_s"]
    inference = r["inference"]
    assert inference["rows"] == 6
    for loop in ("comp", "plain_loop", "pipeline"):
        assert inference[loop]["samples_per_s"] > 0 and inference[loop]["peak_rss_mb"] > 0
    assert inference["comp_over_plain"] == inference["comp"]["samples_per_s"] / inference["plain_loop"]["samples_per_s"]
    assert 0 < inference["comp_mfu"]


def test_seed_quality_padding_to_the_pair_changes_no_output(tmp_path, tiny_model):
    """The quality check pads the seed's pairs to their longer row instead of 512: the same outputs."""
    import numpy as np
    import torch

    from comp.config import ModelConfig
    from comp.nn.model import load_encoder, load_tokenizer
    from comp.tables.features import MetaEncoder

    tables = make_tables(n_train=10, n_test=2)
    frame = tables["train.csv"].reset_index(drop=True)
    enc = MetaEncoder(["shop"], ["count"]).fit(frame)
    mcfg = ModelConfig(name_or_path=str(tiny_model), max_length=48)
    tok = load_tokenizer(mcfg)
    texts = list(frame["body"])
    torch.manual_seed(0)
    model = bench.SeedModel(load_encoder(mcfg), enc.width, 3).eval()
    outs = []
    for pair in (False, True):
        ds = bench.SeedDataset(texts, frame, enc, frame["label"].to_numpy() - 1, tok, 128, pair)
        widths = {d["input_ids"].shape[1] for d, _ in ds.loader()}
        assert (widths == {128}) != pair  # fixed 512-style padding, or each pair to its longer row
        outs.append(bench.seed_predict(model, ds, torch.device("cpu"))[0])
    assert np.allclose(outs[0], outs[1], atol=1e-5)


def test_bench_refuses_a_count_below_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--rounds", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds must be at least 1 (got 0)" in err[0]
    assert not out.exists()


def test_the_gpu_bench_times_every_loop_cold_and_warm_on_each_shape(tmp_path, tiny_model, capsys):
    from comp import bench_gpu
    from tests.conftest import assert_user_error
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=40, n_test=4))
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--config", str(cfg), "--tiny", "--models", "bert-base,deberta-v3-base,demo",
                           "--lengths", "16,32", "--train-rows", "12", "--inference-rows", "10", "--quiet",
                           "--out", str(out), "--set", "train.batch_size=4"]) == 0
    r = json.loads(out.read_text())
    assert [(x["model"], x["max_length"]) for x in r["runs"]] == [
        (m, n) for m in ("bert-base", "deberta-v3-base", "demo") for n in (16, 32)]
    for x in r["runs"]:
        assert x["train_rows"] == 12 and x["inference_rows"] == 10 and x["flop_params"] > 0
        assert 0 < x["useful_tokens_per_row"] <= x["max_length"]  # the demo's own length mix, cut at max_length
        loops = [x["comp"], x["trainer"], *x["inference"].values()]
        for loop in loops:
            assert loop["cold"]["samples_per_s"] > 0 and loop["warm"]["samples_per_s"] > 0 and loop["mfu"] > 0
        assert "skipped" in x["trainer_flat"]  # no flash-attn on a CPU: said, not timed
        assert x["ratios"]["comp_over_trainer"] == x["comp"]["warm"]["samples_per_s"] / x["trainer"]["warm"]["samples_per_s"]
    assert_user_error(bench_gpu.main(["--config", str(cfg), "--models", "gpt-5"]), capsys, "unknown 'gpt-5'")
