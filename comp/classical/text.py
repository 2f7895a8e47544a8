"""The classical runs' text features: sublinear TF-IDF of word and character n-grams whose terms are hashed, so
that no vocabulary is built or saved. A table's n-gram counts are computed once (on every core) and kept in a
Counts cache that every fold, tuning trial and prediction of the same texts shares; a fold then keeps the
columns its own training rows show (min_df, the max_features most frequent) with their idf, and its validation
rows choose nothing. Folds saved before hashing (format 1) carry their vocabularies and predict as they did."""

from __future__ import annotations

import re

import numpy as np
from joblib import Parallel, delayed
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer
from sklearn.pipeline import FeatureUnion
from sklearn.preprocessing import normalize
from sklearn.utils import murmurhash3_32

from comp.config import TFIDF_BEFORE, Config

HASH_BITS = 22  # columns per vectorizer: collisions among the kept terms are rare (200k of 4M)
WORD_ONLY_ROWS = 200_000  # analyzer "auto" drops the character n-grams of spaced text on more training rows
UNSPACED = 0.3  # texts whose characters are at least this share CJK, kana or Thai are read without word spaces
# Han, kana, Thai: scripts that write words without spaces between them (Hangul has spaces: not here)
NO_SPACES = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
CHUNK = 20_000  # texts per parallel task
OLD_SPEC = {k: v for k, v in TFIDF_BEFORE.items() if k != "C"}  # what linear runs saved before [model.tfidf]


def unspaced_share(texts: list[str], sample: int = 2000) -> float:
    """The share of (non-space) characters of these texts, up to `sample` of them, in scripts without word spaces."""
    text = "".join(texts[:sample])
    letters = sum(not ch.isspace() for ch in text)
    return len(NO_SPACES.findall(text)) / letters if letters else 0.0


def tfidf_spec(cfg: Config, texts: list[str]) -> dict:
    """[model.tfidf] with its "auto" analyzer and n-grams resolved for these (a fold's training) texts: characters
    for text without word spaces; else words and characters within words, words alone beyond WORD_ONLY_ROWS rows
    (the character n-grams cost 6× the words' memory and time there, for little)."""
    t = cfg.model.tfidf
    analyzer = t.analyzer
    if analyzer == "auto":
        analyzer = ("char" if unspaced_share(texts) >= UNSPACED else
                    "word" if len(texts) > WORD_ONLY_ROWS else "word+char_wb")
    char = t.char_ngrams if t.char_ngrams != "auto" else (1, 2) if analyzer == "char" else (2, 5)
    return {"analyzer": analyzer, "word_ngrams": list(t.word_ngrams), "char_ngrams": list(char),
            "max_features": t.max_features, "min_df": t.min_df}


def analyzers(spec: dict) -> dict[str, dict]:
    """The spec's vectorizers by name: their scikit-learn analyzer and n-gram range."""
    word = {"word": {"analyzer": "word", "ngram_range": tuple(spec["word_ngrams"])}}
    if spec["analyzer"] == "word":
        return word
    if spec["analyzer"] == "char":
        return {"char": {"analyzer": "char", "ngram_range": tuple(spec["char_ngrams"])}}
    return {**word, "char": {"analyzer": "char_wb", "ngram_range": tuple(spec["char_ngrams"])}}


def hashing(kw: dict) -> HashingVectorizer:
    return HashingVectorizer(**kw, n_features=2 ** HASH_BITS, alternate_sign=False, norm=None, dtype=np.float32)


def _counts(kw: dict, texts: list[str]) -> sparse.csr_matrix:
    """Sublinear term frequencies (1 + log count) of hashed n-grams."""
    m = hashing(kw).transform(texts)
    m.data = 1.0 + np.log(m.data)
    return m


class Counts:
    """Hashed n-gram counts of the texts seen so far, per vectorizer; a text is counted once, however many folds,
    trials or runs ask for it, in parallel over `jobs` processes (default: the threads torch has)."""

    def __init__(self, jobs: int | None = None):
        self.jobs, self.rows, self.matrices = jobs, {}, {}

    def __call__(self, kw: dict, texts: list[str]) -> sparse.csr_matrix:
        key = repr(sorted(kw.items()))
        rows = self.rows.setdefault(key, {})
        new = list(dict.fromkeys(t for t in texts if t not in rows))
        if new:
            rows.update(zip(new, range(len(rows), len(rows) + len(new)), strict=True))
            parts = self._count(kw, new)
            self.matrices[key] = sparse.vstack([self.matrices[key], *parts] if key in self.matrices else parts,
                                               format="csr")
        return self.matrices[key][np.fromiter((rows[t] for t in texts), np.int64, len(texts))]

    def _count(self, kw: dict, texts: list[str]) -> list[sparse.csr_matrix]:
        chunks = [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]
        if len(chunks) < 2:
            return [_counts(kw, c) for c in chunks]
        if self.jobs is None:
            import torch

            self.jobs = torch.get_num_threads()
        return Parallel(n_jobs=self.jobs)(delayed(_counts)(kw, c) for c in chunks)


class HashedTfidf:
    """A fold's TF-IDF on hashed counts: per vectorizer, the columns kept and their idf (smoothed, as
    scikit-learn's), rows L2-normalised per vectorizer."""

    def __init__(self, spec: dict, columns: dict | None = None, idf: dict | None = None):
        self.spec, self.columns, self.idf = spec, columns or {}, idf or {}

    def fit(self, texts: list[str], counts: Counts) -> HashedTfidf | None:
        """The columns these rows show in at least min_df rows, the max_features most frequent; None if none."""
        for name, kw in analyzers(self.spec).items():
            m = counts(kw, texts)
            df = np.bincount(m.indices, minlength=m.shape[1])
            kept = np.flatnonzero(df >= self.spec["min_df"])
            if len(kept) > self.spec["max_features"]:
                kept = np.sort(kept[np.argsort(-df[kept], kind="stable")[:self.spec["max_features"]]])
            self.columns[name] = kept.astype(np.int64)
            self.idf[name] = (np.log((1 + len(texts)) / (1 + df[kept])) + 1).astype(np.float32)
        return self if any(len(c) for c in self.columns.values()) else None

    def transform(self, texts: list[str], counts: Counts) -> sparse.csr_matrix:
        parts = []
        for name, kw in analyzers(self.spec).items():
            m = counts(kw, texts)[:, self.columns[name]]
            parts.append(normalize(m @ sparse.diags(self.idf[name]), copy=False))
        return sparse.hstack(parts, format="csr")

    def arrays(self) -> dict:
        """What save writes (safetensors): columns and idf per vectorizer."""
        return {**{f"columns_{n}": c for n, c in self.columns.items()}, **{f"idf_{n}": v for n, v in self.idf.items()}}

    @classmethod
    def from_arrays(cls, spec: dict, arrays: dict) -> HashedTfidf:
        names = analyzers(spec)
        return cls(spec, {n: arrays[f"columns_{n}"].astype(np.int64) for n in names},
                   {n: arrays[f"idf_{n}"].astype(np.float32) for n in names})

    def feature_names(self, texts: list[str]) -> list[str]:
        """word__… / char__… names of the kept columns: a term of `texts` that hashes there (else #column)."""
        names = []
        for name, kw in analyzers(self.spec).items():
            analyze, found = hashing(kw).build_analyzer(), {}
            for text in texts:
                for term in analyze(text):
                    found.setdefault(abs(murmurhash3_32(term, seed=0)) % 2 ** HASH_BITS, term)
            names += [f"{name}__{found.get(int(c), f'#{c}')}" for c in self.columns[name]]
        return names


class VocabularyTfidf:
    """The TF-IDF of a fold saved before hashing: its vectorizers with their vocabularies and idf."""

    def __init__(self, spec: dict, vocabularies: dict, arrays: dict):
        kinds = analyzers(spec)
        self.union = FeatureUnion([(name, TfidfVectorizer(**kw, min_df=spec["min_df"], sublinear_tf=True,
                                                          max_features=spec["max_features"],
                                                          vocabulary=vocabularies[name]))
                                   for name, kw in kinds.items()])
        for name, vectorizer in self.union.transformer_list:
            vectorizer.idf_ = arrays[f"idf_{name}"]

    def transform(self, texts: list[str], counts: Counts) -> sparse.csr_matrix:
        return self.union.transform(texts)


def load_text(spec: dict, saved: dict, arrays: dict) -> HashedTfidf | VocabularyTfidf | None:
    """A fold's text features as save wrote them: hashed (format 2), or the vocabularies of format 1."""
    if saved.get("vocabularies") is not None:
        return VocabularyTfidf(spec, saved["vocabularies"], arrays)
    return HashedTfidf.from_arrays(spec, arrays) if saved.get("hashed") else None
