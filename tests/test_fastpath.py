"""The CPU training kernels compute what the stock ones do: dropout's rate and scaling, attention's output and
gradients (with padding), the fused optimizer's update."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from comp.config import ModelConfig, TrainConfig
from comp.nn import batching, fastpath, state
from comp.nn.model import build_model, load_encoder, load_tokenizer


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = fastpath.dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.004
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased, as nn.Dropout
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    assert fastpath.dropout(x, p, training=False) is x and fastpath.dropout(x, 0.0) is x


def test_dropout_masks_follow_the_torch_generator():
    x = torch.ones(1000)
    torch.manual_seed(1)
    a = fastpath.dropout(x, 0.2)
    torch.manual_seed(1)
    b = fastpath.dropout(x, 0.2)
    c = fastpath.dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(b, c)  # seeded runs and resumed runs repeat their masks


def test_install_swaps_every_dropout_and_the_attention(tiny_model):
    mcfg = ModelConfig(name_or_path=str(tiny_model), head_hidden=(8,), dropout=0.3, max_length=48)
    stock = [m.p for m in load_encoder(mcfg).modules() if isinstance(m, nn.Dropout)]
    model = build_model(mcfg, 2, 3)
    assert not [m for m in model.modules() if type(m) is nn.Dropout]
    ps = [m.p for m in model.encoder.modules() if isinstance(m, fastpath.Dropout)]
    assert ps == stock and len(ps) > 0
    assert [m.p for m in model.head.modules() if isinstance(m, fastpath.Dropout)] == [0.3]
    assert model.encoder.config._attn_implementation == fastpath.ATTENTION


@pytest.fixture
def batch(tiny_model):
    mcfg = ModelConfig(name_or_path=str(tiny_model), head_hidden=(8,), dropout=0.0, max_length=48)
    tok = load_tokenizer(mcfg)
    texts = ["the dress fits", "lovely", "awful broken refund the size was very plain and the color feels ugly",
             "great comfy fabric and stunning color"]
    rows = batching.Rows(batching.tokenize(tok, texts, 48), np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32),
                       np.arange(4) % 3)
    return mcfg, rows, batching.collate(rows, np.arange(4), tok.pad_token_id, torch.device("cpu"))


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _logits_and_grads(model, inputs, amp=None):
    model.zero_grad()
    logits = model(*inputs, amp)
    logits.square().sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_training_attention_matches_sdpa_with_padding(batch, pooling):
    mcfg, rows, inputs = batch
    torch.manual_seed(0)
    model = _no_dropout(build_model(ModelConfig(**{**mcfg.__dict__, "pooling": pooling}), 2, 3)).train()
    stock = copy.deepcopy(model)
    stock.encoder.config._attn_implementation = "sdpa"
    assert model.encoder.config._attn_implementation == fastpath.ATTENTION
    ours, ours_grads = _logits_and_grads(model, inputs)
    ref, ref_grads = _logits_and_grads(stock, inputs)
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # padding never changes a training-mode output either: each row alone, unpadded
    for i in range(len(rows)):
        ids, mask, meta = batching.collate(rows, np.array([i]), 0, torch.device("cpu"))
        assert torch.allclose(model(ids, mask, meta), ours[i:i + 1], atol=1e-5)
    # and under bf16 autocast the two agree to bf16's precision
    low, _ = _logits_and_grads(model, inputs, torch.bfloat16)
    low_ref, _ = _logits_and_grads(stock, inputs, torch.bfloat16)
    assert torch.allclose(low, low_ref, atol=0.05 * ref.abs().max().item())


def test_attention_dropout_applies_in_training_only(batch):
    mcfg, _, inputs = batch
    torch.manual_seed(0)
    model = _no_dropout(build_model(mcfg, 2, 3))
    for layer in model.encoder.encoder.layer:
        layer.attention.self.dropout.p = 0.5  # the attention probabilities' dropout, nothing else
    stock = copy.deepcopy(model)
    stock.encoder.config._attn_implementation = "sdpa"
    model.train()
    a, b = model(*inputs), model(*inputs)
    assert not torch.allclose(a, b)
    model.eval(), stock.eval()
    assert torch.allclose(model(*inputs), stock(*inputs), atol=1e-6)


def test_fused_optimizer_takes_the_same_step(batch):
    mcfg, _, _ = batch
    torch.manual_seed(0)
    model = _no_dropout(build_model(mcfg, 2, 3))
    tcfg = TrainConfig(encoder_lr=1e-3, head_lr=1e-2, weight_decay=0.1)
    ref_model = copy.deepcopy(model)
    opt = state.make_optimizer(model, tcfg)
    assert opt.defaults["fused"]
    ref = torch.optim.AdamW([{**g, "params": [dict(ref_model.named_parameters())[n] for n in names]}
                             for g, names in _group_names(opt, model)], foreach=False)
    for step in range(3):
        # the same gradients for both: a backward pass would hand them rounding noise where the true gradient
        # is 0 (attention's key biases), which Adam scales up to full-size steps of random sign
        for m, o in ((model, opt), (ref_model, ref)):
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            o.step()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def _group_names(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}, [names[id(p)] for p in g["params"]])
            for g in opt.param_groups]


def test_attention_takes_masks_broadcast_over_the_batch():
    torch.manual_seed(0)
    module = nn.Module().train()
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 3:] = False  # the last two keys are padding for every row
    ours, _ = fastpath.attention(module, q, k, v, mask)
    ref = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-5)
