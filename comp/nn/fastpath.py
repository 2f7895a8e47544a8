"""Training kernels for the CPU that compute what the stock ones do, faster.

On a CPU the stock training step of a small encoder spends about a quarter of its time drawing dropout
masks (`bernoulli_` makes one 32-bit draw per element) and, with attention dropout on, runs SDPA's
unfused math path; with attention dropout off SDPA's fused CPU kernel is quick forward but several
times slower backward than two batched matmuls. So, on the CPU and in training only:
- dropout keeps each element with probability 1 - p (p to 1/65,536) from 16-bit slices of 64-bit draws
  of the same torch generator, scaling the kept ones by 1/(1 - p) as `nn.Dropout` does;
- attention is softmax(scale·QKᵀ + mask)·V with two batched matmuls (the mask folded into the first),
  the softmax in the activations' precision (fp32 inside the kernel), dropout as above on its output.
Everything else, evaluation and every other device (CUDA's fused kernels are already fast) run the stock
code: `nn.functional.dropout` and transformers' SDPA attention."""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "comp"  # the name the encoder's config gets: transformers' attention and mask registries


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of 0 (probability p, to 1/65,536) and 1/(1 - p), from the default generator of `device`."""
    n = shape.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    bits = draws.view(torch.int16)[:n].view(shape)  # four uniform 16-bit integers per draw
    return (bits >= round(p * 65536) - 32768).to(dtype).mul_(1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`nn.functional.dropout`, with the cheaper mask on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, True)
    return x * keep_mask(x.shape, p, x.dtype, x.device)


_dropout_fn = dropout  # `attention` takes an argument named dropout (transformers' signature)


class Dropout(nn.Dropout):
    """`nn.Dropout` with `dropout`'s mask on the CPU (same p, same scaling, same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


_bias_cache: list = [None, None, None]  # (mask, (batch, heads), bias): every layer of a forward gets the same mask


def _additive(mask: torch.Tensor, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The (batch·heads, q, k) additive bias of a (1 or batch, 1 or heads, q, k) boolean or additive mask."""
    mask_, shape_, bias = _bias_cache
    if mask_ is mask and shape_ == (batch, heads) and bias.dtype == dtype:
        return bias
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    q, k = mask.shape[-2:]
    bias = bias.expand(batch, heads, q, k).reshape(batch * heads, q, k)
    _bias_cache[:] = [mask, (batch, heads), bias]
    return bias


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """A transformers attention function: the batched-matmul path in CPU training, SDPA's otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    plain = (module.training and query.device.type == "cpu" and not causal and query.shape[1] == key.shape[1]
             and query.shape[-1] == value.shape[-1] and not any(kwargs.get(k) is not None for k in
                                                               ("position_bias", "softcap", "sliding_window", "s_aux"))
             and not kwargs.get("output_attentions"))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    scaling = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b * h, q_len, d)
    k = key.reshape(b * h, k_len, d).transpose(1, 2)
    if attention_mask is not None:
        scores = torch.baddbmm(_additive(attention_mask, b, h, query.dtype), q, k, alpha=scaling)
    else:
        scores = torch.bmm(q, k) * scaling
    probs = _dropout_fn(torch.softmax(scores, dim=-1), dropout, True)
    out = torch.bmm(probs, value.reshape(b * h, k_len, d)).view(b, h, q_len, d)
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # a transformers without attention registries: the stock attention stays
        return False
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return True


REGISTERED = _register()


def install(model: nn.Module) -> nn.Module:
    """Swap every plain `nn.Dropout` of `model` for `Dropout`, and point each transformers encoder inside
    that can take a registered attention function (and uses SDPA or eager attention) at `attention`."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    for m in model.modules():
        config = getattr(m, "config", None)
        if (REGISTERED and getattr(m, "_supports_attention_backend", False) and config is not None
                and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
                and getattr(config, "attn_logit_softcapping", None) is None):  # Gemma-2: its own eager attention
            config._attn_implementation = ATTENTION
    return model
