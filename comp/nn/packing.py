"""Padding-free batches (train.packing): a batch's rows laid end to end in one row of tokens, positions starting
again at each row, and the rows' boundaries (cu_seqlens). The encoder sees each row alone: through
FlashAttention-2's variable-length kernel where it runs it (no padding token is computed, no attention across
rows), else through a block-diagonal mask (causal inside each block for a decoder), which gives the same
outputs but computes attention over the whole packed row: the reference the tests compare with, not a speed-up."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from comp.config import TrainConfig, is_decoder
from comp.errors import CompError

FLASH = ("flash_attention_2", "flash_attention_3")
UNPACKED = {"distilbert"}  # model types whose encoders take no position_ids: their batches stay padded
OWN_MASKS = ("deberta-v2", "deberta")  # they mask their embeddings with the attention mask: called in two steps
# RoBERTa-style position ids start after the padding id
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "data2vec-text"}


@dataclass
class Packed:
    """One packed batch: input_ids and position_ids of shape (1, total tokens), cu_seqlens (rows + 1, int32)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    longest: int

    @property
    def rows(self) -> int:
        return len(self.cu_seqlens) - 1


def pack(seqs: list[np.ndarray], device: torch.device) -> Packed:
    """The rows' token ids end to end (no padding), with their positions and boundaries."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    tensors = [torch.from_numpy(np.concatenate(seqs).astype(np.int64))[None], torch.from_numpy(positions)[None],
               torch.from_numpy(cu)]
    if device.type == "cuda":
        tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return Packed(*tensors, longest=int(lengths.max()))


def encoder_inputs(packed: Packed, encoder: nn.Module) -> dict:
    """The keyword arguments that make `encoder` read the packed rows one by one."""
    config = encoder.config
    offset = config.pad_token_id + 1 if config.model_type in OFFSET_POSITIONS else 0
    common = {"input_ids": packed.input_ids, "position_ids": packed.position_ids + offset}
    if config._attn_implementation in FLASH:
        cu = packed.cu_seqlens
        return {**common, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": packed.longest,
                "max_length_k": packed.longest}
    row = torch.repeat_interleave(torch.arange(packed.rows, device=packed.cu_seqlens.device),
                                  packed.cu_seqlens.diff().long())
    allowed = row[:, None] == row[None, :]
    if is_decoder(config.model_type):
        allowed &= torch.ones_like(allowed).tril()
    if config.model_type in OWN_MASKS:  # its own masking: (batch, query, key) of 0 / 1
        return {**common, "attention_mask": allowed[None].long()}
    if config._attn_implementation == "eager":
        blocked = torch.finfo(encoder.dtype).min
        return {**common, "attention_mask": torch.zeros(allowed.shape, dtype=encoder.dtype,
                                                        device=allowed.device).masked_fill(~allowed, blocked)[None, None]}
    return {**common, "attention_mask": allowed[None, None]}


def hidden_states(packed: Packed, encoder: nn.Module) -> torch.Tensor:
    """The encoder's last hidden states (1, tokens, width) for the packed rows."""
    inputs = encoder_inputs(packed, encoder)
    if encoder.config.model_type in OWN_MASKS:  # the embeddings take a mask per token, the layers one per pair
        embedded = encoder.embeddings(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                      mask=torch.ones_like(inputs["input_ids"]))
        return encoder.encoder(embedded, inputs["attention_mask"]).last_hidden_state
    return encoder(**inputs).last_hidden_state


def pool(hidden: torch.Tensor, packed: Packed, how: str) -> torch.Tensor:
    """One vector per row of the packed hidden states (1, tokens, width): its first token (cls), its last (last)
    or the mean of its tokens (mean)."""
    cu = packed.cu_seqlens.long()
    states = hidden[0]
    if how == "cls":
        return states[cu[:-1]]
    if how == "last":
        return states[cu[1:] - 1]
    lengths = cu.diff()
    row = torch.repeat_interleave(torch.arange(packed.rows, device=states.device), lengths)
    return states.new_zeros((packed.rows, states.shape[1])).index_add(0, row, states) / lengths[:, None].to(states.dtype)


def flash_ready(device: torch.device) -> bool:
    """FlashAttention-2 can run here: a CUDA GPU of compute capability 8.0 or more, with the flash-attn package."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
            and importlib.util.find_spec("flash_attn") is not None)


def attention_for(tcfg: TrainConfig, device: torch.device) -> str | None:
    """The attention implementation to load the encoder with: FlashAttention-2 where packing may use it."""
    return "flash_attention_2" if tcfg.packing != "off" and flash_ready(device) else None


def attention_window(config) -> int | None:
    """The sliding window of the encoder's attention where any of its layers has one (Mistral, Gemma-2/3,
    ModernBERT's local layers), else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return window


def packs(tcfg: TrainConfig, encoder: nn.Module, chunked: bool, paired: bool, max_length: int) -> bool:
    """Whether batches are packed: train.packing = "on" (any encoder; on a CPU or without FlashAttention-2 only a
    check, slower than buckets), "auto" where the encoder runs FlashAttention-2, never "off". Rows read in
    windows (model.chunks) or as text pairs with token types keep their padded batches. "on" is refused for an
    encoder whose sliding window is shorter than model.max_length: the block-diagonal mask would drop it."""
    config = encoder.config
    if chunked or paired or tcfg.packing == "off" or config.model_type in UNPACKED:
        return False
    if tcfg.packing == "on":
        refuse_window(config, max_length, config._attn_implementation)
    return tcfg.packing == "on" or config._attn_implementation in FLASH


def refuse_window(config, max_length: int, attention: str | None) -> None:
    """One line for an encoder whose sliding window is shorter than model.max_length where its batches would be
    packed through the block-diagonal mask, which drops the window (FlashAttention-2 keeps it)."""
    window = attention_window(config)
    if attention not in FLASH and window and window < max_length:
        raise CompError(f"train.packing = \"on\": {config.model_type} attends through a sliding window of {window} "
                        f"tokens, shorter than model.max_length = {max_length}, which a packed batch's mask would "
                        f"drop: set train.packing = \"auto\" (padded batches here) or model.max_length <= {window}")
