import numpy as np
import pytest
import torch
from rich.console import Console

from comp.config import ModelConfig, TrainConfig
from comp.nn import batching, engine, hardware, loop, objective, state
from comp.nn.batching import Rows
from comp.nn.distributed import SINGLE, shard_batches
from comp.nn.model import build_model, load_tokenizer
from comp.nn.state import EarlyStopping


def test_train_batches_cover_every_row_once_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1003)
    batches = batching.train_batches(lengths, 16, np.random.default_rng(1), pool=10)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1003))
    # within a batch the lengths are close: far tighter than random batches
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)
    again = batching.train_batches(lengths, 16, np.random.default_rng(1), pool=10)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = batching.train_batches(lengths, 16, np.random.default_rng(2), pool=10)
    assert not np.array_equal(np.concatenate(other), flat)


def test_inference_batches_sorted_and_complete():
    lengths = np.array([5, 1, 9, 3, 7])
    batches = batching.inference_batches(lengths, 2)
    assert np.concatenate(batches).tolist() == [1, 3, 0, 4, 2]


@pytest.fixture
def tiny(tiny_model):
    mcfg = ModelConfig(name_or_path=str(tiny_model), head_hidden=(8,), dropout=0.0, max_length=48)
    tok = load_tokenizer(mcfg)
    texts = ["the dress fits", "lovely", "awful broken refund the size was very plain and the color feels ugly",
             "okay shirt", "great comfy fabric and stunning color"] * 3
    rows = Rows(batching.tokenize(tok, texts, 48), np.random.default_rng(0).normal(size=(15, 2)).astype(np.float32),
                np.arange(15) % 3)
    return mcfg, tok, rows


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_never_changes_a_prediction(tiny, pooling):
    mcfg, tok, rows = tiny
    mcfg = ModelConfig(**{**mcfg.__dict__, "pooling": pooling})
    torch.manual_seed(0)
    model = build_model(mcfg, 2, 3)
    cpu = torch.device("cpu")
    one_by_one = loop.predict(model, rows, 1, tok.pad_token_id, cpu, None)  # no padding at all
    batched = loop.predict(model, rows, 4, tok.pad_token_id, cpu, None)   # padded to each batch's longest row
    assert np.allclose(one_by_one, batched, atol=1e-5)


def test_predict_restores_row_order(tiny):
    mcfg, tok, rows = tiny
    model = build_model(mcfg, 2, 3)
    full = loop.predict(model, rows, 4, tok.pad_token_id, torch.device("cpu"), None)
    reversed_rows = Rows(rows.tokens[::-1], rows.meta[::-1].copy(), None)
    back = loop.predict(model, reversed_rows, 4, tok.pad_token_id, torch.device("cpu"), None)
    assert np.allclose(full, back[::-1], atol=1e-5)


def test_pooling_changes_the_computation(tiny):
    mcfg, tok, rows = tiny
    outs = []
    for pooling in ("cls", "mean"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**mcfg.__dict__, "pooling": pooling}), 2, 3)
        outs.append(loop.predict(model, rows, 4, tok.pad_token_id, torch.device("cpu"), None))
    assert not np.allclose(outs[0], outs[1])


def test_metadata_reaches_the_head(tiny):
    mcfg, tok, rows = tiny
    model = build_model(mcfg, 2, 3)
    a = loop.predict(model, rows, 4, tok.pad_token_id, torch.device("cpu"), None)
    b = loop.predict(model, Rows(rows.tokens, rows.meta + 1.0), 4, tok.pad_token_id, torch.device("cpu"), None)
    assert not np.allclose(a, b)


def test_optimizer_groups_use_their_learning_rates(tiny):
    mcfg, _, _ = tiny
    model = build_model(mcfg, 2, 3)
    opt = state.make_optimizer(model, TrainConfig(encoder_lr=1e-5, head_lr=1e-3))
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in opt.param_groups:
        expected = 1e-5 if id(group["params"][0]) in encoder_ids else 1e-3
        assert group["lr"] == expected
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_early_stopping():
    s = EarlyStopping("val_loss", patience=2)
    assert s.step(1.0, 1) and not s.step(1.1, 2) and not s.should_stop
    assert not s.step(1.2, 3) and s.should_stop and s.best_epoch == 1
    f1 = EarlyStopping("val_macro_f1", patience=1)
    assert f1.step(0.3, 1) and f1.step(0.5, 2) and not f1.step(0.4, 3) and f1.should_stop and f1.best_epoch == 2


def test_tokenization_cache_hit_and_invalidation(tmp_path, tiny):
    mcfg, tok, _ = tiny
    texts = ["the dress fits", "lovely comfy fabric", "awful"]
    cache = tmp_path / "cache"
    first, hit = batching.cached_tokenize(tok, texts, 48, cache)
    assert not hit and len(list(cache.glob("tokens-*.offsets.npy"))) == 1
    again, hit = batching.cached_tokenize(tok, texts, 48, cache)
    assert hit and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert isinstance(again[0], np.memmap)  # read from the disk as batches need them, not loaded whole
    assert all(np.array_equal(a, b) for a, b in zip(first, batching.tokenize(tok, texts, 48), strict=True))
    assert not batching.cached_tokenize(tok, texts, 4, cache)[1]                        # max_length changed
    assert not batching.cached_tokenize(tok, [*texts[:2], "awful!"], 48, cache)[1]      # a text changed
    other = load_tokenizer(mcfg)
    other.add_tokens(["zzzword"])
    assert not batching.cached_tokenize(other, texts, 48, cache)[1]                     # the tokenizer changed
    assert batching.cached_tokenize(tok, texts, 48, cache)[1]


def test_grad_accumulation_matches_one_big_batch(tiny):
    mcfg, tok, rows = tiny
    index = np.arange(14)
    params = []
    for batches, accum in (([index[:7], index[7:]], 2), ([index], 1)):
        torch.manual_seed(0)
        model = build_model(mcfg, 2, 3)
        for m in model.modules():  # the encoder's own dropout would draw different masks per batch shape
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        tcfg = TrainConfig(grad_accum_steps=accum, grad_clip=0.0, warmup_ratio=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the accumulated gradient itself
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

        _epoch(model, rows, batches, tcfg, tok.pad_token_id, opt, sched)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_token_budget_caps_padded_batch_size_and_keeps_every_row():
    lengths = np.random.default_rng(3).integers(4, 120, size=500)
    batches = batching.train_batches(lengths, 32, np.random.default_rng(0), pool=5, max_tokens=1500)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 1500 or len(b) == 1 for b in batches)
    assert all(len(b) <= 32 for b in batches)
    plain = batching.train_batches(lengths, 32, np.random.default_rng(0), pool=5)
    assert len(batches) > len(plain)  # long rows went into smaller batches
    assert max(len(b) for b in batches) == 32  # short rows still fill whole batches


def test_pad_to_multiple_rounds_widths_within_the_longest_row_and_changes_no_update(tiny):
    mcfg, tok, rows = tiny
    cpu = torch.device("cpu")
    longest = int(rows.lengths.max())
    for index in (np.array([0, 1]), np.array([2]), np.arange(15)):
        ids, mask, _ = batching.collate(rows, index, tok.pad_token_id, cpu, 8, longest)
        own = int(rows.lengths[index].max())
        assert ids.shape[1] == max(own, min(-(-own // 8) * 8, longest))
        assert mask.sum().item() == rows.lengths[index].sum()  # the extra columns are padding only
        assert (ids[mask == 0] == tok.pad_token_id).all()
    params = []
    for multiple in (1, 8):
        torch.manual_seed(0)
        model = build_model(mcfg, 2, 3)
        for m in model.modules():  # dropout masks are drawn per padded shape
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        tcfg = TrainConfig(pad_to_multiple_of=multiple, grad_clip=0.0, log_every=1)
        opt = state.make_optimizer(model, tcfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

        _epoch(model, rows, [np.array([0, 1, 3]), np.array([2, 4]), np.arange(5, 15)], tcfg, tok.pad_token_id,
               opt, sched)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)



@pytest.mark.parametrize(("capability", "expected"), [((6, 0), torch.float16), ((7, 0), torch.float16),
                                                      ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                      ((9, 0), torch.bfloat16)])
def test_auto_precision_on_gpus_takes_bf16_only_where_it_is_native(capability, expected):
    assert hardware.native_precision("cuda", capability, set()) == expected


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "avx512f"}, None), ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                                 ({"amx_bf16", "amx_tile"}, torch.bfloat16), (set(), None)])
def test_auto_precision_on_cpus_follows_the_bf16_flags(flags, expected):
    assert hardware.native_precision("cpu", None, flags) == expected


def _sgd_update(mcfg, tok, rows, batches, accum, scales=None):
    """The parameters after one epoch of plain SGD (lr 1, no dropout, no clipping) over these batches."""
    torch.manual_seed(0)
    model = build_model(mcfg, 2, 3)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tcfg = TrainConfig(grad_accum_steps=accum, grad_clip=0.0, warmup_ratio=0.0)
    _epoch(model, rows, batches, tcfg, tok.pad_token_id, scales=scales)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _epoch(model, rows, batches, tcfg, pad_id, opt=None, sched=None, scales=None, loss_fn=None):
    """One train_one_epoch over these batches (each share's loss scaled by `scales`, by default 1 / accum) with
    a bare training state: SGD at lr 1 unless an optimizer is given."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=1.0)
    sched = sched or torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    rt = loop.Runtime(tcfg, torch.device("cpu"), None, pad_id, loss_fn or torch.nn.CrossEntropyLoss())
    scales = scales or [1.0 / tcfg.grad_accum_steps] * len(batches)
    return loop.train_one_epoch(state.TrainState.bare(model, opt, sched), rows, list(zip(batches, scales, strict=True)),
                                rt, loop.make_progress(Console(quiet=True)))


def test_grad_accumulation_weights_micro_batches_by_rows_and_a_partial_group_by_its_own(tiny):
    mcfg, tok, rows = tiny
    index = np.arange(14)
    batches = [index[:7], index[7:10], index[10:]]  # groups of 2: rows 0-9 (7 + 3), then rows 10-13 alone
    scales = [w for _, w in shard_batches(batches, SINGLE, 2)]
    assert scales == pytest.approx([0.7, 0.3, 1.0])
    accumulated = _sgd_update(mcfg, tok, rows, batches, 2, scales)
    whole = _sgd_update(mcfg, tok, rows, [index[:10], index[10:]], 1)
    assert torch.allclose(accumulated, whole, atol=1e-5)


def test_the_schedule_spans_exactly_the_optimizer_steps_taken(tmp_path, tiny_model, monkeypatch):
    """Token budgets make each epoch's batch count depend on its draw (rows shuffled into length-sorted pools):
    the schedule counts the real optimizer steps, not one draw's."""
    from comp import config
    from tests.conftest import write_project

    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=3", "train.patience=5", "train.batch_size=4",
                                                            "train.max_tokens_per_batch=40", "train.grad_accum_steps=1",
                                                            "model.head_hidden=[4]"])
    rng = np.random.default_rng(0)
    tokens = [rng.integers(5, 60, size=n).astype(np.int32) for n in rng.integers(3, 30, size=600)]
    rows = Rows(tokens, np.zeros((600, 0), np.float32), rng.integers(0, 3, size=600))
    planned, taken = {}, []
    real = engine.get_linear_schedule_with_warmup  # as fit_fold's set-up calls it

    def spy(optimizer, warmup, total):
        planned["total"] = total
        scheduler = real(optimizer, warmup, total)
        step = scheduler.step
        scheduler.step = lambda *a: (taken.append(1), step(*a))
        return scheduler

    monkeypatch.setattr(engine, "get_linear_schedule_with_warmup", spy)
    model = build_model(cfg.model, 0, 3, root=cfg.root)
    fold = engine.Fold(0, rows, Rows(tokens[:20], rows.meta[:20], rows.y[:20]), None, 0)
    engine.fit_fold(cfg, model, fold, Console(quiet=True))
    assert planned["total"] == len(taken)


def test_a_nan_epoch_never_becomes_the_best():
    stopper = EarlyStopping("val_loss", patience=2)
    assert not stopper.step(float("nan"), 1)
    assert stopper.step(0.9, 2) and stopper.best_epoch == 2
    assert not stopper.step(float("inf"), 3) and stopper.best_epoch == 2
    maximise = EarlyStopping("val_macro_f1", patience=1)
    assert not maximise.step(float("nan"), 1) and maximise.step(0.1, 2)


def test_the_resume_checkpoint_belongs_to_one_world_size(tmp_path, project):
    from comp import config
    from comp.nn.distributed import Dist
    from comp.outputs.runs import checkpoint_identity
    from comp.tables import read as tables

    cfg = config.load(project)
    comp = tables.load_competition(cfg)
    one, two = checkpoint_identity(cfg, comp, 0, "fp"), checkpoint_identity(cfg, comp, 0, "fp", Dist(0, 2))
    assert one != two
    saved = state.Checkpoint(tmp_path / "last.pt", one)
    torch.save({"identity": one}, saved.path)
    assert saved.load() is not None and state.Checkpoint(saved.path, two).load() is None


def test_validation_loss_is_the_training_objective_on_the_validation_rows():
    from comp import metrics

    y = np.array([0, 0, 0, 1])
    rows = Rows([np.zeros(1, np.int32)] * 4, np.zeros((4, 0), np.float32), y)
    logits = np.array([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0]], dtype=np.float32)
    scores = metrics.score(y, logits)
    plain = TrainConfig(loss="ce")
    balanced = TrainConfig(loss="balanced_ce")
    assert objective.validation_loss(plain, None, rows, logits, scores) == scores["log_loss"]
    loss_fn = objective.make_loss(balanced, np.array([0, 0, 0, 1]), 2, torch.device("cpu"))
    nll = -torch.log_softmax(torch.from_numpy(logits), 1)[torch.arange(4), torch.from_numpy(y)].numpy()
    weights = np.array([4 / 6, 4 / 6, 4 / 6, 2.0])  # n / (k * count): class 0 three rows, class 1 one
    expected = (weights * nll).sum() / weights.sum()
    assert objective.validation_loss(balanced, loss_fn, rows, logits, scores) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(scores["log_loss"])


def test_early_stopping_can_follow_qwk(tmp_path, tiny_model):
    """train.monitor = "val_qwk": every epoch's row carries it and the best epoch is the one where it peaked."""
    from comp import config
    from tests.conftest import write_project

    cfg = config.load(write_project(tmp_path, tiny_model), ["train.epochs=3", "train.patience=3",
                                                            "train.monitor=val_qwk"])
    rng = np.random.default_rng(0)
    tokens = [rng.integers(5, 60, size=n).astype(np.int32) for n in rng.integers(3, 30, size=60)]
    rows = Rows(tokens, np.zeros((60, 0), np.float32), rng.integers(0, 3, size=60))
    result = engine.fit_fold(cfg, build_model(cfg.model, 0, 3, root=cfg.root), engine.Fold(0, rows, rows, None, 0),
                             Console(quiet=True))
    values = [h["val_qwk"] for h in result.history]
    assert len(values) == 3 and result.best_epoch == int(np.argmax(values)) + 1


def test_tail_and_head_tail_keep_the_ends_of_a_long_text_between_its_specials(tiny, tmp_path):
    from comp.nn.batching import Truncation

    _, tok, _ = tiny
    text = [" ".join(["awful broken refund worst ugly lovely great fine plain okay"] * 3)]
    full = batching.tokenize(tok, text, 1000)[0]
    cls, body, sep = full[0], list(full[1:-1]), full[-1]
    assert len(body) > 20
    assert list(batching.tokenize(tok, text, 10)[0]) == [cls, *body[:8], sep]
    assert list(batching.tokenize(tok, text, Truncation(10, "tail"))[0]) == [cls, *body[-8:], sep]
    assert list(batching.tokenize(tok, text, Truncation(10, "head_tail", 3))[0]) == [cls, *body[:3], *body[-5:], sep]
    for mode in ("tail", "head_tail"):  # a text that fits is whole in every mode
        assert np.array_equal(batching.tokenize(tok, ["lovely fabric"], Truncation(10, mode, 3))[0],
                              batching.tokenize(tok, ["lovely fabric"], 10)[0])
    cache = tmp_path / "cache"
    assert not batching.cached_tokenize(tok, text, 10, cache)[1]
    tail, hit = batching.cached_tokenize(tok, text, Truncation(10, "tail"), cache)
    assert not hit and list(tail[0]) == [cls, *body[-8:], sep]  # another truncation, another cache entry
    assert batching.cached_tokenize(tok, text, Truncation(10, "tail"), cache)[1]


def test_batches_made_ahead_are_the_same_batches_in_the_same_order():
    import threading
    made = lambda i: (i, threading.current_thread().name)  # noqa: E731
    ahead = list(batching.ahead(made, range(6), torch.device("cuda")))  # the GPU's way: a helper thread makes them
    assert [i for i, _ in ahead] == list(range(6)) and {t for _, t in ahead} == {"comp-batches_0"}
    inline = list(batching.ahead(made, range(6), torch.device("cpu")))
    assert [i for i, _ in inline] == list(range(6)) and {t for _, t in inline} == {threading.current_thread().name}
    assert list(batching.ahead(made, [], torch.device("cuda"))) == []


def test_a_fold_trained_on_batches_made_ahead_is_the_fold_trained_without(tmp_path, tiny_model, monkeypatch):
    import threading

    from tests.conftest import fold0_oof
    args = ["--quiet", "--set", "train.epochs=2", "--set", "train.batch_size=4"]
    plain = fold0_oof(tmp_path / "plain", tiny_model, None, args)
    threads = set()
    collate = batching.collate

    def watched(*a, **kw):
        threads.add(threading.current_thread().name)
        return collate(*a, **kw)

    monkeypatch.setattr(batching, "collate", watched)
    monkeypatch.setattr(batching, "PREFETCH_ON", {"cpu", "cuda"})
    np.testing.assert_array_equal(fold0_oof(tmp_path / "ahead", tiny_model, None, args), plain)
    assert threads == {"comp-batches_0"}  # every batch, training and prediction, was made by the helper


def test_a_fold_trained_on_packed_batches_learns_what_it_learns_on_padded_ones(tmp_path, tiny_model):
    """Without dropout (whose masks are drawn over other shapes) the two paths take the same steps."""
    import json
    import shutil

    from tests.conftest import fold0_oof
    still = tmp_path / "still"
    shutil.copytree(tiny_model, still)
    config = json.loads((still / "config.json").read_text())
    (still / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0}))
    # model.text_norm off: the random encoder's features differ by about 1e-3 between rows, and standardizing
    # them would magnify the two paths' roundings a thousandfold
    args = ["--quiet", "--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "model.dropout=0.0",
            "--set", "model.attention_dropout=0.0", "--set", "model.text_norm=off"]
    padded = fold0_oof(tmp_path / "padded", still, None, [*args, "--set", "train.packing=off"])
    packed = fold0_oof(tmp_path / "packed", still, None, [*args, "--set", "train.packing=on"])
    assert not np.array_equal(packed, padded)  # another path, other roundings ...
    np.testing.assert_allclose(packed, padded, atol=1e-4)  # ... the same fold


@pytest.mark.parametrize(("packing", "capability", "flash", "expected"), [
    ("auto", (8, 0), True, "flash_attention_2"), ("auto", (7, 5), True, None),  # a T4: no FlashAttention-2
    ("auto", (9, 0), False, None), ("off", (9, 0), True, None), ("on", (9, 0), True, "flash_attention_2")])
def test_packing_loads_flash_attention_only_where_it_runs(monkeypatch, packing, capability, flash, expected):
    import importlib.util

    from comp.nn import packing as packing_module
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash else None) if name == "flash_attn" else find_spec(name, *a))
    tcfg = TrainConfig(packing=packing)
    assert packing_module.attention_for(tcfg, torch.device("cuda")) == expected
    assert packing_module.attention_for(tcfg, torch.device("cpu")) is None
    encoder = type("E", (), {"config": type("C", (), {"model_type": "bert", "_attn_implementation": expected or "sdpa"})})
    packed = packing_module.packs(tcfg, encoder, chunked=False, paired=False, max_length=48)
    assert packed == (packing == "on" or expected is not None)
    assert not packing_module.packs(tcfg, encoder, chunked=True, paired=False, max_length=48)  # windows stay padded


def test_linear_layers_held_in_the_autocast_dtype_predict_the_same_bits(tiny):
    from comp.nn.model import hold_for_inference
    mcfg, tok, rows = tiny
    built = build_model(mcfg, 2, 3).eval()
    cpu = torch.device("cpu")
    before = loop.predict(built, rows, 4, tok.pad_token_id, cpu, torch.bfloat16)
    hold_for_inference(built, torch.bfloat16)
    assert {m.weight.dtype for m in built.encoder.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
    np.testing.assert_array_equal(loop.predict(built, rows, 4, tok.pad_token_id, cpu, torch.bfloat16), before)


def test_the_inference_batch_follows_the_device_unless_set():
    assert hardware.eval_rows("auto", torch.device("cpu")) == 16
    assert hardware.eval_rows("auto", torch.device("cuda")) == 128
    assert hardware.eval_rows(40, torch.device("cpu")) == 40


def test_an_encoder_that_cannot_load_flash_attention_keeps_its_attention_and_padded_batches(tiny, monkeypatch):
    """train.packing = "auto" asks for FlashAttention-2 where it should run; where loading it fails (here: a CPU
    without flash-attn), the encoder loads as before and its batches stay padded."""
    from comp.nn import model as model_module
    from comp.nn import packing
    mcfg, _, _ = tiny
    monkeypatch.setattr(packing, "attention_for", lambda tcfg, device: "flash_attention_2")
    built = model_module.build_model(mcfg, 2, 3, tcfg=TrainConfig(device="cpu"))
    assert built.encoder.config._attn_implementation not in packing.FLASH and not built.packs


def test_a_wrong_packed_path_is_caught_on_its_first_batch_and_the_fold_trains_padded(project, monkeypatch, capsys):
    """The packed path checks itself against padded batches before a fold trusts it: forced wrong here (positions
    off by one), the fold says so in one line, records it, and trains exactly as with packing off."""
    import json

    from comp import folds, train
    from comp.nn import packing

    def fold0(name: str, mode: str) -> tuple[dict, np.ndarray]:
        args = ["--config", str(project), "--fold", "0", "--set", f"run.name={name}", "--set", f"train.packing={mode}"]
        assert train.main(args) == 0
        out = project.parent / "folds" / name / "fold_0"
        return json.loads((out / "metrics.json").read_text()), np.load(out / "oof_logits.npy")

    assert folds.main(["--config", str(project), "--quiet"]) == 0
    right, _ = fold0("right", "on")
    assert right["packing"]["packed"] is True and right["packing"]["max_difference"] < 1e-4
    real = packing.encoder_inputs
    monkeypatch.setattr(packing, "encoder_inputs",
                        lambda p, e: {**real(p, e), "position_ids": real(p, e)["position_ids"] + 1})
    capsys.readouterr()
    wrong, wrong_oof = fold0("wrong", "on")
    said = [line for line in capsys.readouterr().out.splitlines() if "packed batches gave logits" in line]
    assert len(said) == 1 and "padded batches from here on" in said[0]
    assert wrong["packing"]["packed"] is False and wrong["packing"]["max_difference"] > 1e-3
    monkeypatch.undo()
    off, off_oof = fold0("off", "off")
    assert off["packing"] is None
    assert np.array_equal(wrong_oof, off_oof)
