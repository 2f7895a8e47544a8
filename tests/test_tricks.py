"""Fine-tuning tricks and gated fusion: each key changes the computation the way it says."""

import dataclasses

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from comp import config
from comp.config import ModelConfig, TrainConfig
from comp.nn import batching, engine, objective, state
from comp.nn.batching import Rows
from comp.nn.model import GATE_BETA, build_model, load_tokenizer
from tests.conftest import assert_user_error, snapshot, write_project


@pytest.fixture
def tiny(tiny_model):
    mcfg = ModelConfig(name_or_path=str(tiny_model), head_hidden=(8,), dropout=0.3, max_length=48)
    tok = load_tokenizer(mcfg)
    texts = ["the dress fits", "lovely", "awful broken refund the size was very plain", "okay shirt",
             "great comfy fabric and stunning color", "plain fine"] * 4
    rows = Rows(batching.tokenize(tok, texts, 48), np.random.default_rng(0).normal(size=(24, 2)).astype(np.float32),
                np.array([0, 0, 0, 0, 1, 2] * 4))
    return mcfg, tok, rows


def batch(rows, tok, n=6):
    return batching.collate(rows, np.arange(n), tok.pad_token_id, torch.device("cpu"))


def test_layer_decay_scales_each_encoder_layer(tiny):
    mcfg, _, _ = tiny
    model = build_model(mcfg, 2, 3)
    tcfg = TrainConfig(encoder_lr=1e-3, head_lr=5e-3, layer_decay=0.5)
    opt = state.make_optimizer(model, tcfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in model.parameters())  # every parameter exactly once
    named = dict(model.named_parameters())
    # 2 layers: layer 1 (top) 0.5, layer 0 0.25, embeddings 0.125 of encoder_lr; the head untouched
    assert lr_of[id(named["encoder.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["encoder.encoder.layer.0.output.dense.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(named["encoder.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    assert lr_of[id(named["out.weight"])] == pytest.approx(5e-3)
    flat = state.make_optimizer(model, TrainConfig(encoder_lr=1e-3, head_lr=5e-3))
    assert {g["lr"] for g in flat.param_groups} == {1e-3, 5e-3}


def test_multi_sample_dropout_averages_head_passes(tiny):
    mcfg, tok, rows = tiny
    ids, mask, meta = batch(rows, tok)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(mcfg, msd_samples=4, text_norm="off"), 2, 3)
    model.train()
    model.encoder.eval()  # only the head's dropout is random below
    torch.manual_seed(1)
    got = model(ids, mask, meta)
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.manual_seed(1)
    fused = model.fuse(hidden, meta)
    wide = model.wide(meta)  # the metadata's linear path, outside the dropout
    passes = [model.out(model.head(fused)) + wide for _ in range(4)]
    assert torch.allclose(got, torch.stack(passes).mean(0), atol=1e-5)
    assert not torch.allclose(got, passes[0], atol=1e-3)  # not one sample
    model.eval()  # at inference: one pass, no dropout
    assert torch.allclose(model(ids, mask, meta), model.out(model.head(fused)) + wide, atol=1e-5)


def test_losses(tiny):
    _, _, rows = tiny
    logits = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
    y = torch.from_numpy(rows.y)
    cpu = torch.device("cpu")
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(objective.make_loss(TrainConfig(), rows.y, 3, cpu)(logits, y), ce)
    # balanced: 16 / 4 / 4 rows -> weights n / (k count) = 0.5, 2, 2
    balanced = objective.make_loss(TrainConfig(loss="balanced_ce"), rows.y, 3, cpu)
    w = torch.tensor([0.5, 2.0, 2.0])
    per_row = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(balanced(logits, y), (w[y] * per_row).sum() / w[y].sum())
    focal = objective.make_loss(TrainConfig(loss="focal", focal_gamma=2.0), rows.y, 3, cpu)
    p = torch.softmax(logits, 1)[torch.arange(24), y]
    assert torch.allclose(focal(logits, y), ((1 - p) ** 2 * per_row).mean(), atol=1e-6)
    assert torch.allclose(objective.make_loss(TrainConfig(loss="focal", focal_gamma=0.0), rows.y, 3, cpu)(logits, y), ce)


def test_ema_shadow_after_n_updates_is_the_warmed_up_average(tiny):
    """After n updates the shadow is the recursion s_t = d_t s_(t-1) + (1 - d_t) w_t with the warm-up decay
    d_t = min(decay, (1 + t) / (10 + t)), starting from the initial weights; evaluation swaps it in and out."""
    mcfg, _, _ = tiny
    model = build_model(mcfg, 2, 3)
    ema = state.EMA(model, 0.9)
    expected = model.out.weight.detach().clone().double()
    for t in range(1, 31):
        with torch.no_grad():
            model.out.weight.add_(0.1 * t)
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * model.out.weight.detach().double()
    assert ema.updates == 30
    assert torch.allclose(ema.shadow["out.weight"].double(), expected, atol=1e-5)
    own = model.out.weight.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model.out.weight, ema.shadow["out.weight"])
    assert torch.equal(model.out.weight, own)  # its own weights back


def test_reinit_layers_redraws_only_the_top_layers(tiny, tiny_model, tmp_path):
    """The top layer is drawn afresh by the encoder's own initializer (weights N(0, initializer_range), biases 0,
    LayerNorm 1 / 0); the layers below keep their pretrained weights."""
    import shutil

    from safetensors.torch import save_file

    mcfg, _, _ = tiny
    shutil.copytree(tiny_model, tmp_path / "m")
    saved = {k: v * 3 + 1 if "layer.1." in k else v  # a pretrained top layer unlike any fresh draw
             for k, v in load_file(str(tiny_model / "model.safetensors")).items()}
    save_file(saved, str(tmp_path / "m" / "model.safetensors"))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(mcfg, name_or_path=str(tmp_path / "m"), reinit_layers=1), 2, 3)
    std = model.encoder.config.initializer_range
    for name, value in model.encoder.state_dict().items():
        if "layer.0." in name:
            assert torch.equal(value, saved.get("bert." + name, saved.get(name))), name
        elif "layer.1." in name and name.endswith("weight") and "LayerNorm" not in name:
            assert abs(value.mean().item()) < 0.02 and abs(value.std().item() - std) < 0.25 * std, name
        elif "layer.1." in name:
            fresh = torch.ones_like(value) if "LayerNorm.weight" in name else torch.zeros_like(value)
            assert torch.equal(value, fresh), name
    with pytest.raises(Exception, match="reinit_layers = 5"):
        build_model(dataclasses.replace(mcfg, reinit_layers=5), 2, 3)


def test_gated_fusion_lets_metadata_shift_the_text_vector(tiny):
    mcfg, tok, rows = tiny
    ids, mask, meta = batch(rows, tok)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(mcfg, fusion="gated", dropout=0.0), 2, 3).eval()
    concat = build_model(dataclasses.replace(mcfg, dropout=0.0), 2, 3)
    hidden = model.encoder.config.hidden_size
    assert model.head[1].in_features == hidden and concat.head[1].in_features == hidden + 2
    text = torch.randn(6, hidden)
    fused = model.fuse(text, meta)
    shift = fused - text
    assert (shift.norm(dim=1) <= GATE_BETA * text.norm(dim=1) + 1e-5).all()  # capped shift
    assert shift.abs().sum() > 0
    assert not torch.allclose(model(ids, mask, meta), model(ids, mask, meta + 1.0))  # metadata matters
    # without metadata columns there is nothing to gate
    assert build_model(dataclasses.replace(mcfg, fusion="gated"), 0, 3).fusion == "concat"


def test_text_norm_is_fitted_on_the_training_rows_and_then_a_fixed_map_of_each_row(tiny):
    mcfg, tok, rows = tiny
    ids, mask, meta = batch(rows, tok, n=24)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(mcfg, dropout=0.0), 2, 3)
    rt = engine.runtime(TrainConfig(device="cpu", precision="fp32"), model, engine.Fold(0, rows, None, None, tok.pad_token_id),
                        engine.SINGLE)
    engine.fit_text_norm(model, rows, rt, np.random.default_rng(0))
    seen, raw = [], []
    model.text_norm.register_forward_hook(lambda module, inputs, out: seen.append(out) or raw.append(inputs[0]))
    model.eval()
    model(ids, mask, meta)
    x = raw[0]  # all 24 rows were the sample: their moments, the deviation floored at 5% of the vectors' rms
    expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + engine.TEXT_NORM_FLOOR ** 2 * x.pow(2).mean()).sqrt()
    assert torch.allclose(seen[0], expected, atol=1e-4)
    assert torch.allclose(seen[0].mean(0), torch.zeros(seen[0].shape[1]), atol=1e-4)
    model.train()  # in training too, each row's vector depends on that row alone
    model.encoder.eval()
    model(ids[:1], mask[:1], meta[:1])
    assert torch.allclose(seen[-1][0], seen[0][0], atol=1e-5)
    off = build_model(dataclasses.replace(mcfg, text_norm="off"), 2, 3)
    assert off.text_norm is None and "text_norm.center" not in off.state_dict() and "text_norm.center" in model.state_dict()


def test_ema_and_tricks_run_through_fit_fold(tmp_path, tiny_model, tiny):
    """Each key reaches the loop: with it the fold's validation logits differ from the plain run's."""
    _, tok, rows = tiny
    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=1", "train.batch_size=6", "train.loss=ce"])
    results = {}
    for name, overrides in {"plain": {}, "ema": {"train": {"ema_decay": 0.9}},
                            "layer_decay": {"train": {"layer_decay": 0.3}}, "focal": {"train": {"loss": "focal"}},
                            "balanced": {"train": {"loss": "balanced_ce"}}, "msd": {"model": {"msd_samples": 3}},
                            "reinit": {"model": {"reinit_layers": 1}}, "gated": {"model": {"fusion": "gated"}}}.items():
        c = cfg
        for section, changes in overrides.items():
            c = c.replace(section, **changes)
        torch.manual_seed(0)
        model = build_model(c.model, 2, 3, root=c.root)
        res = engine.fit_fold(c, model, engine.Fold(0, rows, rows, None, tok.pad_token_id), Console(quiet=True))
        results[name] = res.val_logits
    for name, logits in results.items():
        if name != "plain":
            assert not np.allclose(logits, results["plain"], atol=1e-6), name


def test_attention_dropout_override_reaches_the_encoder(tiny):
    mcfg, _, _ = tiny
    assert build_model(mcfg, 2, 3).encoder.config.attention_probs_dropout_prob == 0.1  # the encoder's own
    model = build_model(dataclasses.replace(mcfg, attention_dropout=0.0), 2, 3)
    assert model.encoder.config.attention_probs_dropout_prob == 0.0
    assert model.encoder.config.hidden_dropout_prob == 0.1  # only attention dropout changes
    assert model.encoder.encoder.layer[0].attention.self.dropout.p == 0.0


def test_gradient_checkpointing_recomputes_and_changes_no_update(tmp_path, tiny_model, tiny):
    """The encoder's blocks recompute their activations in the backward pass with the same dropout masks: the
    fold learns exactly what it learns without it."""
    _, tok, rows = tiny
    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=1", "train.batch_size=6"])
    logits = {}
    for on in (False, True):
        c = cfg.replace("train", gradient_checkpointing=on)
        torch.manual_seed(0)
        model = build_model(c.model, 2, 3, root=c.root)
        logits[on] = engine.fit_fold(c, model, engine.Fold(0, rows, rows, None, tok.pad_token_id),
                                     Console(quiet=True)).val_logits
        enc = model.encoder
        assert (enc.is_activation_checkpointing if hasattr(enc, "activation_checkpointing_enable")
                else enc.is_gradient_checkpointing) == on
    assert np.allclose(logits[False], logits[True], atol=1e-5)


def test_adamw_8bit_is_refused_in_one_line_without_bitsandbytes(project, capsys, monkeypatch):
    import sys

    from comp import folds, train

    assert folds.main(["--config", str(project)]) == 0
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as where it is not installed
    before = snapshot(project.parent)
    code = train.main(["--config", str(project), "--fold", "0", "--set", "train.optimizer=adamw_8bit"])
    assert_user_error(code, capsys, "bitsandbytes", "train.optimizer")
    assert snapshot(project.parent) == before


def test_adamw_8bit_takes_the_same_parameter_groups(monkeypatch, tiny):
    """With bitsandbytes present, its AdamW8bit gets the groups AdamW would (learning rates, decay)."""
    import sys
    import types

    seen = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, groups):
            seen["groups"] = groups
            super().__init__(groups)

    fake = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=FakeAdamW8bit))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    model = build_model(tiny[0], 2, 3)
    tcfg = TrainConfig(optimizer="adamw_8bit", encoder_lr=1e-5, head_lr=1e-3)
    assert isinstance(state.make_optimizer(model, tcfg), FakeAdamW8bit)
    plain = state.make_optimizer(model, TrainConfig(encoder_lr=1e-5, head_lr=1e-3))
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in seen["groups"]] == \
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in plain.param_groups]


def test_awp_moves_weight_matrices_within_eps_and_restores_them_exactly(tiny):
    mcfg, tok, rows = tiny
    model = build_model(mcfg, 2, 3)
    ids, mask, meta = batch(rows, tok)
    torch.nn.functional.cross_entropy(model(ids, mask, meta), torch.from_numpy(rows.y[:6])).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    awp = state.AWP(model, lr=1.0, eps=0.01)
    assert awp.params and all(p.ndim >= 2 for _, p in awp.params)
    awp.perturb()
    assert sum(not torch.equal(p, before[n]) for n, p in awp.params) >= len(awp.params) // 2
    for n, p in awp.params:
        assert ((p - before[n]).abs() <= 0.01 * before[n].abs() + 1e-7).all(), n
    untouched = {n for n, _ in model.named_parameters()} - {n for n, _ in awp.params}
    assert untouched and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in untouched)
    awp.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_awp_params_choose_the_perturbed_matrices(tiny):
    mcfg, _, _ = tiny
    model = build_model(mcfg, 2, 3)
    every = {n for n, _ in state.AWP(model, 1.0, 0.01).params}
    encoder = {n for n, _ in state.AWP(model, 1.0, 0.01, "encoder").params}
    embeddings = [p for _, p in state.AWP(model, 1.0, 0.01, "embeddings").params]
    assert encoder < every and all(n.startswith("encoder.") for n in encoder) and "out.weight" in every - encoder
    assert len(embeddings) == 1 and embeddings[0] is model.encoder.get_input_embeddings().weight


def test_a_fold_trained_with_awp_learns_otherwise(project):
    from comp import folds, train

    assert folds.main(["--config", str(project)]) == 0
    for name, lr in (("plain", 0.0), ("awp", 1.0)):
        args = ["--config", str(project), "--fold", "0", "--quiet", "--set", f"run.name={name}",
                "--set", f"train.awp_lr={lr}", "--set", "train.awp_eps=0.01"]
        assert train.main(args) == 0
    oof = [np.load(project.parent / "folds" / n / "fold_0" / "oof_logits.npy") for n in ("plain", "awp")]
    assert np.isfinite(oof[1]).all() and not np.allclose(oof[0], oof[1], atol=1e-4)


def test_average_weights_is_the_mean_of_known_weights():
    states = [{"w": torch.full((2, 2), v), "b": torch.tensor([v, -v]), "steps": torch.tensor([i], dtype=torch.long)}
              for i, v in enumerate((1.0, 2.0, 6.0))]
    avg = state.average_weights(states)
    assert torch.equal(avg["w"], torch.full((2, 2), 3.0)) and torch.equal(avg["b"], torch.tensor([3.0, -3.0]))
    assert torch.equal(avg["steps"], torch.tensor([0]))  # integer buffers are not averaged: the first one's
    bf16 = [{"w": torch.tensor([v], dtype=torch.bfloat16)} for v in (1.0, 2.0)]
    half = state.average_weights(bf16)
    assert half["w"].dtype == torch.bfloat16 and half["w"].item() == 1.5


def test_snapshots_keep_the_last_n_or_the_best_n():
    model = torch.nn.Linear(1, 1)
    values = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.6}
    last, soup = state.Snapshots("last", 2, "min"), state.Snapshots("soup", 2, "min")
    for epoch, value in values.items():
        with torch.no_grad():
            model.weight.fill_(epoch)
        last.add(model, epoch, value)
        soup.add(model, epoch, value)
    assert [s["epoch"] for s in last.kept] == [3, 4]
    assert [s["epoch"] for s in soup.ranked()] == [2, 4]  # the two lowest losses, best first
    assert [s["weights"]["weight"].item() for s in soup.ranked()] == [2.0, 4.0]  # copies, not the live weights
    maxed = state.Snapshots("soup", 2, "max")
    for epoch, value in values.items():
        maxed.add(model, epoch, value)
    assert [s["epoch"] for s in maxed.ranked()] == [1, 3]


def swa_fold(cfg, tok, rows, monkeypatch, mode, always=False):
    """fit_fold with train.swa = mode over 3 epochs; returns the result and the weights of each epoch's end."""
    seen = {}
    add = state.Snapshots.add

    def spy(self, model, epoch, value):
        seen[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        add(self, model, epoch, value)

    monkeypatch.setattr(state.Snapshots, "add", spy)
    if always:  # every average validates at least as well: the averaging path is taken
        monkeypatch.setattr(engine, "improves", lambda *a, **k: True)
    c = cfg.replace("train", swa=mode, swa_epochs=3)
    torch.manual_seed(0)
    model = build_model(c.model, 2, 3, root=c.root)
    res = engine.fit_fold(c, model, engine.Fold(0, rows, rows, None, tok.pad_token_id), Console(quiet=True))
    return res, seen


@pytest.mark.parametrize("mode", ["last", "soup"])
def test_swa_keeps_the_mean_of_the_epochs_weights(tmp_path, tiny_model, tiny, monkeypatch, mode):
    _, tok, rows = tiny
    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=3", "train.patience=3", "train.batch_size=6"])
    res, seen = swa_fold(cfg, tok, rows, monkeypatch, mode, always=True)
    assert res.swa["kept"] and res.swa["epochs"] == [1, 2, 3] and res.best_row["epochs"] == [1, 2, 3]
    expected = state.average_weights([seen[e] for e in (1, 2, 3)])
    assert all(torch.allclose(res.state_dict[k].float(), v.float(), atol=1e-6) for k, v in expected.items())
    model = build_model(cfg.model, 2, 3, root=cfg.root)
    model.load_state_dict(res.state_dict)  # the OOF logits are the averaged weights' own
    logits = engine.predict(model, rows, 7, tok.pad_token_id, torch.device("cpu"), None)
    assert np.allclose(logits, res.val_logits, atol=1e-5)


def test_swa_average_is_kept_only_when_validation_does_not_worsen(tmp_path, tiny_model, tiny, monkeypatch):
    _, tok, rows = tiny
    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=3", "train.patience=3", "train.batch_size=6"])
    res, seen = swa_fold(cfg, tok, rows, monkeypatch, "soup")
    best = res.history[res.best_epoch - 1]["val_loss"]
    assert res.best_row["val_loss"] <= best
    if not res.swa["kept"]:
        assert res.swa["epochs"] == [res.best_epoch] and res.best_row["val_loss"] == best
        assert all(torch.equal(res.state_dict[k], seen[res.best_epoch][k]) for k in res.state_dict)
    else:
        assert res.best_epoch in res.swa["epochs"] and len(res.swa["epochs"]) >= 2


def test_swa_snapshots_are_in_the_checkpoint(tiny):
    mcfg, _, _ = tiny
    model = build_model(mcfg, 2, 3)
    opt = state.make_optimizer(model, TrainConfig())
    st = state.TrainState.bare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    st.snapshots = state.Snapshots("last", 2, "min")
    st.snapshots.add(model, 1, 0.5)
    blob = st.to_blob()
    other = state.TrainState.bare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    other.snapshots = state.Snapshots("last", 2, "min")
    other.load_blob(blob, torch.device("cpu"))
    assert [s["epoch"] for s in other.snapshots.kept] == [1]
    assert all(torch.equal(other.snapshots.kept[0]["weights"][k], v) for k, v in model.state_dict().items())


def test_swa_keys_are_checked(project, capsys):
    from comp import train

    for setting, needle in (("train.swa=mean", "train.swa must be"), ("train.swa_epochs=1", "swa_epochs must be >= 2")):
        before = snapshot(project.parent)
        code = train.main(["--config", str(project), "--fold", "0", "--set", setting])
        assert_user_error(code, capsys, needle)
        assert snapshot(project.parent) == before
    code = train.main(["--config", str(project), "--fold", "0", "--set", "train.swa=last", "--set", "train.swa_epochs=3"])
    assert_user_error(code, capsys, "swa_epochs must be <= train.epochs")
