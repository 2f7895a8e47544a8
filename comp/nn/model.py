"""Encoder → pooled vector ⊕ encoded metadata (concatenated, or gating the text vector) → dropout → MLP (ReLU)
→ class logits, label logits or regression values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from comp.classical.baselines import linear_outputs
from comp.config import LoraConfig, ModelConfig, TrainConfig, pooling_for, resolve_model_path
from comp.errors import CompError
from comp.metrics import MULTI, REGRESSION, SINGLE
from comp.nn import fastpath, packing
from comp.nn.hardware import resolve_device

NO_POOLER = {"bert", "roberta", "xlm-roberta", "ernie", "camembert"}
# Names the encoder configs of transformers give to the dropout on attention probabilities.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def load_tokenizer(mcfg: ModelConfig, root: Path = Path(".")) -> PreTrainedTokenizerBase:
    """The model's tokenizer (fast where one exists); a bad model path is a CompError."""
    path = resolve_model_path(mcfg.name_or_path, root)
    try:
        return AutoTokenizer.from_pretrained(path, **_gguf(mcfg))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad path
        raise CompError(_bad_model(mcfg.name_or_path, exc)) from None


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's own, unless it has none or pads with its end-of-text token
    (SmolLM2, Llama-3, Qwen base models); then its unknown token or another special token that is neither
    begin nor end of text. Attention masks come from each row's length, never from this id, so an EOS inside a
    text (or any id) is never taken for padding."""
    ends = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    added = [i for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids, *added):
        if candidate is not None and candidate not in ends:
            return candidate
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _gguf(mcfg: ModelConfig) -> dict:
    """from_pretrained's arguments for model.gguf_file (whose conversion bar, a bare tqdm, stays quiet)."""
    if not mcfg.gguf_file:
        return {}
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gguf_utils.tqdm = lambda items, **_: items
    return {"gguf_file": mcfg.gguf_file}


def encoder_config(mcfg: ModelConfig, path: str):
    """The encoder's transformers config with the [model] overrides applied (attention dropout)."""
    config = AutoConfig.from_pretrained(path, **_gguf(mcfg))
    if mcfg.attention_dropout is not None:  # 0: no mask drawn for the attention probabilities
        for name in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, name):
                setattr(config, name, mcfg.attention_dropout)
    return config


def load_encoder(mcfg: ModelConfig, pretrained: bool = True, root: Path = Path("."),
                 placement: dict | None = None, attention: str | None = None) -> nn.Module:
    """The encoder with its pretrained weights (or only its architecture, to load saved weights into).
    `placement`: from_pretrained's keys that place it over devices (hardware.layer_split); `attention`: an
    attention implementation to load it with (packing.attention_for)."""
    path = resolve_model_path(mcfg.name_or_path, root)
    try:
        config = encoder_config(mcfg, path)
        # The task head pools itself: BERT-style pooler weights would be dead parameters. Weights are fp32
        # whatever dtype the checkpoint was saved in (transformers loads "auto" by default): the optimizer
        # keeps fp32 master weights and autocast picks the compute precision.
        kwargs = {"add_pooling_layer": False} if config.model_type in NO_POOLER else {}
        kwargs["dtype"] = torch.float32
        if pretrained:
            kwargs |= _gguf(mcfg) | quantized(mcfg) | (placement or {})

        def load(**extra) -> nn.Module:
            if pretrained:
                return AutoModel.from_pretrained(path, config=config, **kwargs, **extra)
            return AutoModel.from_config(config, **kwargs, **extra)
        if attention is not None and _supports_flash(config):
            try:
                return load(attn_implementation=attention)
            except (ImportError, ValueError, RuntimeError):  # the kernel cannot run here: the default attention
                pass
        return load()
    except CompError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompError(_bad_model(mcfg.name_or_path, exc)) from None


def _supports_flash(config) -> bool:
    try:
        return bool(getattr(AutoModel._model_mapping[type(config)], "_supports_flash_attn", False))
    except KeyError:
        return False


def quantized(mcfg: ModelConfig) -> dict:
    """model.quantize: the base's weights in bitsandbytes' 4-bit NF4 or 8-bit, on the current CUDA device (its
    adapters train in full precision). The CPU and a missing bitsandbytes are refused before anything runs."""
    if mcfg.quantize == "off":
        return {}
    check_quantize(mcfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    from transformers import BitsAndBytesConfig
    bits = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
                              if torch.cuda.is_bf16_supported() else torch.float16) \
        if mcfg.quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bits, "device_map": {"": torch.cuda.current_device()}}


def check_packing(mcfg: ModelConfig, tcfg: TrainConfig, root: Path) -> None:
    """train.packing = "on" for an encoder whose batches it cannot pack exactly (packing.refuse_window) is one
    line before anything is written."""
    if tcfg.packing == "on":
        config = encoder_config(mcfg, resolve_model_path(mcfg.name_or_path, root))
        packing.refuse_window(config, mcfg.max_length, packing.attention_for(tcfg, resolve_device(tcfg)))


def check_quantize(mcfg: ModelConfig, device: torch.device) -> None:
    """model.quantize needs a CUDA device and the bitsandbytes package: one line otherwise."""
    if mcfg.quantize == "off":
        return
    if device.type != "cuda":
        raise CompError(f"model.quantize = {mcfg.quantize!r} runs on a CUDA GPU only (bitsandbytes), and this run is "
                        f"on {device.type}: set model.quantize = \"off\" here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CompError(f"model.quantize = {mcfg.quantize!r} needs the bitsandbytes package: pip install "
                        "bitsandbytes (or set model.quantize = \"off\")") from None


def with_lora(encoder: nn.Module, lcfg: LoraConfig) -> nn.Module:
    """The encoder with LoRA adapters (peft) injected in place; every weight of its own is frozen."""
    try:
        from peft import LoraConfig as PeftLora
        from peft import inject_adapter_in_model
    except ImportError:
        raise CompError("model.lora needs the peft package: pip install peft (make install has it)") from None
    targets = "all-linear" if list(lcfg.targets) == ["all-linear"] else list(lcfg.targets)
    spec = PeftLora(r=lcfg.r, lora_alpha=lcfg.alpha or 2 * lcfg.r, lora_dropout=lcfg.dropout, target_modules=targets,
                    bias="none")
    try:
        encoder = inject_adapter_in_model(spec, encoder)
    except ValueError as exc:
        raise CompError(f"model.lora.targets {list(lcfg.targets)}: {str(exc).splitlines()[0][:200]}") from None
    for name, p in encoder.named_parameters():
        p.requires_grad = "lora_" in name
    return encoder


def load_masked_lm(mcfg: ModelConfig, root: Path = Path(".")) -> nn.Module:
    """The encoder with its masked-language-model head (comp.pretrain), in fp32; a head the checkpoint lacks
    starts from the architecture's initialisation."""
    path = resolve_model_path(mcfg.name_or_path, root)
    try:
        return AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise CompError(_bad_model(mcfg.name_or_path, exc)) from None


def _bad_model(name: str, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
    return (f"model.name_or_path {name!r} could not be loaded ({first}); give a local Hugging Face model folder "
            "(config.json + weights + tokenizer) or an installed packaged model")


GATE_BETA = 0.2  # the gated shift's norm is at most this share of the text vector's (MAG / Multimodal-Toolkit)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer blocks (BERT-style `encoder.layer` or any `layers` list)."""
    for name in ("encoder.layer", "layer", "layers", "transformer.layer", "encoder.layers"):
        module = encoder
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise CompError(f"cannot find the transformer blocks of {type(encoder).__name__}: model.reinit_layers and "
                    "train.layer_decay need a BERT-style encoder")


def reinit_top_layers(encoder: nn.Module, n: int) -> None:
    """Re-draw the weights of the top `n` blocks with the model's own initialiser (seeded by the caller)."""
    layers = encoder_layers(encoder)
    if n > len(layers):
        raise CompError(f"model.reinit_layers = {n} but the encoder has {len(layers)} layers")
    for block in list(layers)[len(layers) - n:]:
        for t in [*block.parameters(), *block.buffers()]:
            t._is_hf_initialized = False  # transformers' initialisers skip tensors loaded from a checkpoint
        with torch.no_grad():
            block.apply(encoder._init_weights)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's vector at the last position its mask keeps, found by position (whichever side was padded)."""
    where = attention_mask * torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return hidden[torch.arange(len(hidden), device=hidden.device), where.argmax(1)]


class TextMetaClassifier(nn.Module):
    """A transformer encoder whose pooled vector is fused with the metadata and fed to an MLP head.
    fusion "concat": [text; meta]. fusion "gated": the metadata shifts the text vector through a gate,
    text + a·(ReLU(W_g[text; meta]) ⊙ W_m meta), the shift's norm capped at GATE_BETA of the text's.
    msd_samples > 1: in training the head runs on that many dropout masks and their logits are averaged.
    wide != "off": a linear map of the metadata is added to the logits (wide & deep), so the metadata's linear
    signal does not have to pass through the dropout and the MLP."""

    def __init__(self, encoder: nn.Module, n_meta: int, n_classes: int, mcfg: ModelConfig, task: str = SINGLE,
                 pair_sep: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.pair_sep = pair_sep  # text pairs on an encoder with token types: the id after which type 1 starts
        if task == REGRESSION:  # the outputs in the targets' own units: standardized value × scale + center
            self.register_buffer("target_center", torch.zeros(n_classes))
            self.register_buffer("target_scale", torch.ones(n_classes))
        self.pooling = pooling_for(encoder.config.model_type, encoder.config._name_or_path) \
            if mcfg.pooling == "auto" else mcfg.pooling
        # With LoRA the encoder's own weights stay as loaded: the state (what is saved, checkpointed, averaged and
        # loaded) is only what trains, the adapters, the head and the buffers outside the encoder.
        self.frozen = {f"encoder.{n}" for n, p in encoder.named_parameters() if not p.requires_grad} | \
            {f"encoder.{n}" for n, _ in encoder.named_buffers()} if mcfg.lora.r else set()
        self.msd_samples = mcfg.msd_samples
        self.packs = False  # whether its batches are packed (train.packing; build_model decides)
        hidden = encoder.config.hidden_size
        self.fusion = mcfg.fusion if n_meta else "concat"
        if self.fusion == "gated":
            self.gate = nn.Linear(hidden + n_meta, hidden)
            self.meta_proj = nn.Linear(n_meta, hidden)
            width = hidden
        else:
            width = hidden + n_meta
        layers: list[nn.Module] = [nn.Dropout(mcfg.dropout)]
        for hidden in mcfg.head_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(width, n_classes)
        # created last, so the head draws the same initial weights with or without it
        self.wide = nn.Linear(n_meta, n_classes) if n_meta and mcfg.wide != "off" else None
        self.text_norm = TextNorm(encoder.config.hidden_size) if mcfg.text_norm == "fitted" else None
        self.wide_init = mcfg.wide
        self.chunk_pooling = mcfg.chunk_pooling  # how a row's windows' vectors become one (model.chunks > 1)
        self.window_score = nn.Linear(encoder.config.hidden_size, 1) \
            if mcfg.chunks > 1 and mcfg.chunk_pooling == "attention" else None
        fastpath.install(self)  # the CPU's cheaper dropout masks and batched-matmul attention in training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, meta: torch.Tensor,
                amp_dtype: torch.dtype | None = None, owner: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (regression: values) in fp32; only the encoder runs under autocast when amp_dtype is given.
        `owner` (model.chunks > 1): input_ids holds windows, owner[w] the row of window w; each row's windows'
        vectors are pooled into one before the head."""
        with torch.autocast(meta.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if isinstance(input_ids, packing.Packed):  # a padding-free batch (train.packing)
                hidden = packing.hidden_states(input_ids, self.encoder)
            else:
                types = {} if self.pair_sep is None else {"token_type_ids": self.token_types(input_ids)}
                hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **types).last_hidden_state
        hidden = hidden.float().to(meta.device)  # from the last device of a layer split
        if isinstance(input_ids, packing.Packed):
            pooled = packing.pool(hidden, input_ids, self.pooling)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = last_token(hidden, attention_mask)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if owner is not None:
            pooled = self.pool_windows(pooled, owner, len(meta))
        if self.text_norm is not None:
            pooled = self.text_norm(pooled)
        fused = self.fuse(pooled, meta.float())
        wide = 0.0 if self.wide is None else self.wide(meta.float())
        if self.training and self.msd_samples > 1:
            return self.in_units(torch.stack([self.out(self.head(fused)) for _ in range(self.msd_samples)]).mean(0) + wide)
        return self.in_units(self.out(self.head(fused)) + wide)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in self.frozen:
            out.pop(prefix + key, None)
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if not self.frozen:
            return super().load_state_dict(state, strict=strict, assign=assign)
        result = super().load_state_dict(state, strict=False, assign=assign)
        wrong = [k for k in result.missing_keys if k not in self.frozen] + list(result.unexpected_keys)
        if strict and wrong:
            raise RuntimeError(f"the saved state does not fit this model (e.g. {wrong[0]}): is it a LoRA fold of this "
                               "config?")
        return result

    def pool_windows(self, vectors: torch.Tensor, owner: torch.Tensor, n_rows: int) -> torch.Tensor:
        """One vector per row from its windows' vectors: their mean, their element-wise max, or their mean
        weighted by a softmax over a learned score of each window (attention)."""
        index = owner[:, None].expand_as(vectors)
        if self.chunk_pooling == "max":
            return vectors.new_full((n_rows, vectors.shape[1]), -torch.inf).scatter_reduce(0, index, vectors, "amax")
        if self.chunk_pooling == "attention":
            score = self.window_score(vectors).squeeze(1)
            top = score.new_full((n_rows,), -torch.inf).scatter_reduce(0, owner, score, "amax")
            weight = (score - top[owner]).exp()
        else:
            weight = torch.ones_like(vectors[:, 0])
        total = weight.new_zeros(n_rows).index_add(0, owner, weight)
        return vectors.new_zeros((n_rows, vectors.shape[1])).index_add(0, owner, vectors * (weight / total[owner])[:, None])

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 up to and including the first separator, 1 after it: the second side of a pair (as the tokenizer's
        own token_type_ids mark it)."""
        sep = (input_ids == self.pair_sep).long()
        return ((sep.cumsum(1) - sep) > 0).long()

    def in_units(self, out: torch.Tensor) -> torch.Tensor:
        """Regression: standardized outputs to the targets' units; logits unchanged."""
        return out * self.target_scale + self.target_center if self.task == REGRESSION else out

    @torch.no_grad()
    def set_target_moments(self, y: np.ndarray) -> None:
        """Regression: the training rows' mean and standard deviation of each target (what in_units applies)."""
        if self.task == REGRESSION:
            center, scale = target_moments(y)
            self.target_center.copy_(torch.as_tensor(center))
            self.target_scale.copy_(torch.as_tensor(scale))

    def fuse(self, text: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        if self.fusion == "gated":
            shift = torch.relu(self.gate(torch.cat([text, meta], dim=1))) * self.meta_proj(meta)
            ratio = GATE_BETA * text.norm(dim=1, keepdim=True) / shift.norm(dim=1, keepdim=True).clamp(min=1e-6)
            return text + ratio.clamp(max=1.0) * shift
        return torch.cat([text, meta], dim=1)

    def place(self, device: torch.device) -> TextMetaClassifier:
        """Everything but an encoder already placed over several devices (a layer split) to `device`."""
        self.head_modules().to(device)
        for name, buffer in self._buffers.items():
            self._buffers[name] = buffer.to(device)
        return self

    def head_modules(self) -> nn.ModuleList:
        """Everything but the encoder (trained at head_lr)."""
        return nn.ModuleList([m for name, m in self.named_children() if name != "encoder"])


class TextNorm(nn.Module):
    """model.text_norm = "fitted": each feature of the pooled text vector centred and scaled by its mean and
    standard deviation over a sample of the fold's training rows, measured once on the pretrained encoder
    (fit_text_norm), a fixed map afterwards (each row's output depends on that row alone). A pretrained encoder's
    pooled vectors share a large common part and differ little (multilingual e5: a mean of norm 4.6, a spread of
    0.08 a feature); unscaled, the head's dropout and first layer hardly see what tells the rows apart."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale


def hold_for_inference(model: TextMetaClassifier, dtype: torch.dtype | None) -> TextMetaClassifier:
    """For prediction only: the encoder's linear layers held in the autocast dtype, which autocast casts their fp32
    weights to on every batch. The outputs are the same, bit for bit; the casts are made once."""
    if dtype is not None:
        for module in model.encoder.modules():
            if type(module) is nn.Linear and module.weight.dtype == torch.float32:
                module.to(dtype)
    return model


@torch.no_grad()
def init_wide(model: TextMetaClassifier, meta: np.ndarray, y: np.ndarray, n_classes: int, balanced: bool,
              seed: int) -> None:
    """wide = "fitted": start the wide path at the linear model of these rows' targets on their metadata (L2):
    a logistic regression of the class (single_label) or of each label (multi_label), a ridge regression of the
    standardized targets (regression), so training starts near the linear model's predictions and the encoder
    and the MLP learn what it misses. The deep path keeps its random start: zeroing its output layer would starve
    the encoder of gradient for the first steps (measured: worse on the text-heavy demo). wide = "zero": the
    wide path starts at zero."""
    if model.wide is None:
        return
    model.wide.weight.zero_()
    model.wide.bias.zero_()
    if model.wide_init != "fitted":
        return
    if model.task in (MULTI, REGRESSION):  # the linear run's fit of each label / standardized target
        center, scale = target_moments(y) if model.task == REGRESSION else (0.0, 1.0)
        coef, intercept = linear_outputs(model.task, meta, (y - center) / scale, "balanced" if balanced else None, seed)
        model.wide.weight.copy_(torch.as_tensor(coef, dtype=torch.float32))
        model.wide.bias.copy_(torch.as_tensor(intercept, dtype=torch.float32))
    elif len(np.unique(y)) >= 2:
        _init_wide_classes(model, meta, y, n_classes, balanced, seed)


def _init_wide_classes(model: TextMetaClassifier, meta: np.ndarray, y: np.ndarray, n_classes: int, balanced: bool,
                       seed: int) -> None:
    lr = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced" if balanced else None, random_state=seed)
    lr.fit(meta, y)
    rows = torch.as_tensor(lr.classes_)
    model.wide.weight[rows] = torch.as_tensor(lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_, lr.coef_]) / 2,
                                              dtype=torch.float32)
    model.wide.bias[rows] = torch.as_tensor(lr.intercept_ if len(lr.classes_) > 2
                                            else np.array([-lr.intercept_[0], lr.intercept_[0]]) / 2, dtype=torch.float32)
    absent = torch.ones(n_classes, dtype=torch.bool)
    absent[rows] = False
    model.wide.bias[absent] = -20.0  # classes these rows never show


def target_moments(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each regression target's mean and standard deviation over these rows (1 where it is constant), float32."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    std = y.std(0)
    return y.mean(0).astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


# Families whose position ids start after the padding id (padding_idx + 1), so that many table rows are never a
# token's position.
PADDING_OFFSET = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "longformer", "data2vec-text"}


def position_limit(config) -> int | None:
    """How many tokens the encoder reads at most: its absolute position table, less the rows RoBERTa-style
    models reserve below their first position; None where positions are only relative (DeBERTa-v2/v3)."""
    if config.model_type in ("deberta", "deberta-v2") and not getattr(config, "position_biased_input", True):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in PADDING_OFFSET:
        limit -= (config.pad_token_id or 0) + 1
    return limit


def build_model(mcfg: ModelConfig, n_meta: int, n_classes: int, pretrained: bool = True,
                root: Path = Path("."), task: str = SINGLE, pair_sep: int | None = None,
                placement: dict | None = None, tcfg: TrainConfig | None = None) -> TextMetaClassifier:
    """The full classifier for a fold; checks max_length against the encoder's positions. `pair_sep`: text pairs,
    the tokenizer's separator id, which marks the second side's token types on an encoder that has them (BERT,
    ELECTRA, ...; RoBERTa-style encoders tell the sides apart by their separators alone). `placement`: where
    the pretrained encoder's layers go (hardware.layer_split). `tcfg`: the run's train.packing, which may load
    the encoder with FlashAttention-2 and decides whether its batches are packed."""
    attention = packing.attention_for(tcfg, resolve_device(tcfg)) if tcfg is not None else None
    encoder = load_encoder(mcfg, pretrained, root, placement, attention)
    limit = position_limit(encoder.config)
    if limit is not None and mcfg.max_length > limit:
        raise CompError(f"model.max_length = {mcfg.max_length}, but {mcfg.name_or_path!r} supports at most {limit} "
                        "tokens; lower model.max_length")
    if mcfg.reinit_layers and pretrained:
        reinit_top_layers(encoder, mcfg.reinit_layers)
    if mcfg.lora.r:
        encoder = with_lora(encoder, mcfg.lora)
    if (getattr(encoder.config, "type_vocab_size", 0) or 0) < 2:
        pair_sep = None
    model = TextMetaClassifier(encoder, n_meta, n_classes, mcfg, task, pair_sep)
    model.packs = tcfg is not None and packing.packs(tcfg, encoder, mcfg.chunks > 1, pair_sep is not None,
                                                                 mcfg.max_length)
    return model
