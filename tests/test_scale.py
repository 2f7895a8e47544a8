"""Tables of many rows: hashed TF-IDF equal to scikit-learn's, n-grams counted once per table, the costly steps
of a classical fold on a bounded sample, the scale benchmark's tables."""

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.utils import murmurhash3_32

from comp import config, folds, train
from comp.bench_scale import build, measured
from comp.classical import baselines, text
from comp.classical.baselines import GbmRun, LinearRun
from comp.classical.text import HASH_BITS, Counts, HashedTfidf, load_text, tfidf_spec
from comp.tables.read import load_competition
from tests.conftest import make_tables, write_project

SPEC = {"analyzer": "word+char_wb", "word_ngrams": [1, 2], "char_ngrams": [2, 5], "max_features": 200_000,
        "min_df": 2}
KINDS = {"word": {"analyzer": "word", "ngram_range": (1, 2)}, "char": {"analyzer": "char_wb", "ngram_range": (2, 5)}}


def fixture_texts() -> list[str]:
    t = make_tables()["train.csv"]
    return [f"{a or ''} . {b}" for a, b in zip(t["title"], t["body"], strict=True)]


def test_a_hashed_tfidf_equals_scikit_learns_term_for_term():
    texts = fixture_texts()
    counts = Counts()
    hashed = HashedTfidf(SPEC).fit(texts, counts)
    x = hashed.transform(texts, counts).toarray()
    start = 0
    for name, kw in KINDS.items():
        ref = TfidfVectorizer(**kw, min_df=2, sublinear_tf=True)
        expected = ref.fit_transform(texts).toarray()
        column = {abs(murmurhash3_32(term, seed=0)) % 2 ** HASH_BITS: i for term, i in ref.vocabulary_.items()}
        assert len(column) == len(ref.vocabulary_) == len(hashed.columns[name])  # min_df alike, no collision
        order = [column[c] for c in hashed.columns[name]]
        block = x[:, start:start + len(order)]
        assert np.allclose(block, expected[:, order], atol=1e-6)
        start += len(order)
    saved = load_text(SPEC, {"hashed": True}, hashed.arrays())  # what a fold writes and predict reads back
    assert np.allclose(saved.transform(texts, Counts()).toarray(), x, atol=1e-6)


def test_a_fold_saved_with_vocabularies_predicts_as_it_did():
    texts = fixture_texts()
    refs = {name: TfidfVectorizer(**kw, min_df=2, sublinear_tf=True).fit(texts) for name, kw in KINDS.items()}
    vocabularies = {name: sorted(r.vocabulary_, key=r.vocabulary_.get) for name, r in refs.items()}
    old = load_text(SPEC, {"vocabularies": vocabularies}, {f"idf_{n}": r.idf_ for n, r in refs.items()})
    expected = np.hstack([r.transform(texts).toarray() for r in refs.values()])
    assert np.allclose(old.transform(texts, Counts()).toarray(), expected)


def test_max_features_keeps_the_terms_of_the_most_rows():
    texts = ["red blue", "red green", "red blue", "blue", "green red"]
    spec = {**SPEC, "analyzer": "word", "word_ngrams": [1, 1], "min_df": 1, "max_features": 2}
    kept = HashedTfidf(spec).fit(texts, Counts()).columns["word"]
    assert sorted(kept) == sorted(abs(murmurhash3_32(t, seed=0)) % 2 ** HASH_BITS for t in ("red", "blue"))


def test_a_tables_texts_are_counted_once_for_all_folds(tmp_path, tiny_model, monkeypatch):
    path = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(path), "--quiet"]) == 0
    seen = []
    real = text._counts
    monkeypatch.setattr(text, "_counts", lambda kw, texts: seen.append((kw["analyzer"], len(texts))) or real(kw, texts))
    assert train.main(["--config", str(path), "--all", "--quiet", "--set", "model.kind=linear"]) == 0
    comp = load_competition(config.load(path))
    distinct = len(set(comp.train_text + comp.test_text))
    for analyzer in ("word", "char_wb"):
        assert sum(n for a, n in seen if a == analyzer) == distinct  # three folds, each text counted once


def test_on_many_rows_the_search_of_c_and_the_trees_read_a_stratified_sample(tmp_path, tiny_model, monkeypatch):
    cfg = config.load(write_project(tmp_path, tiny_model), ["model.kind=gbm"])
    comp = load_competition(cfg)
    monkeypatch.setattr(baselines, "GBM_ROWS", 30)
    monkeypatch.setattr(baselines, "SEARCH_ROWS", 45)
    sizes, lines = [], []
    monkeypatch.setattr(baselines.LogisticRegression, "fit", record_rows(baselines.LogisticRegression.fit, sizes))
    LinearRun(cfg.replace("model", kind="linear"), 0).fit(comp.train, comp.train_text, comp.y)
    assert max(sizes[:-1]) == 30 and sizes[-1] == len(comp.y)  # inner folds of 45 rows; the final fit on all
    rows = []
    features = GbmRun._features
    monkeypatch.setattr(GbmRun, "_features", lambda self, df, texts: rows.append(len(df)) or features(self, df, texts))
    valid = (comp.train, list(comp.train_text), comp.y)
    GbmRun(cfg, 0, say=lines.append).fit(comp.train, comp.train_text, comp.y, valid)
    assert "fitting on a stratified 30 of the training rows" in lines
    assert rows == [30, 30]  # the trees fit on 30 rows; 30 of the validation rows stop their rounds
    picked = baselines.subsample(comp.y, 30, 0)
    assert np.abs(np.bincount(comp.y[picked]) - np.bincount(comp.y) * 30 / len(comp.y)).max() < 1  # stratified


def record_rows(fit, sizes: list):
    def wrapped(self, x, y, *a, **k):
        sizes.append(x.shape[0])
        return fit(self, x, y, *a, **k)
    return wrapped


def test_analyzer_auto_reads_words_alone_on_many_rows(tmp_path, tiny_model, monkeypatch):
    cfg = config.load(write_project(tmp_path, tiny_model))
    english = ["the dress fits and the fabric feels lovely"] * 5
    assert tfidf_spec(cfg, english)["analyzer"] == "word+char_wb"
    monkeypatch.setattr(text, "WORD_ONLY_ROWS", 4)
    assert tfidf_spec(cfg, english)["analyzer"] == "word"
    assert tfidf_spec(cfg, ["质量太差了，非常失望"] * 5)["analyzer"] == "char"  # no word spaces: characters still
    assert tfidf_spec(cfg.replace("model", tfidf=config.TfidfConfig(analyzer="word+char_wb")),
                      english)["analyzer"] == "word+char_wb"  # a setting beats auto


def test_the_scale_tables_shuffle_each_copys_words_and_keep_the_label_out_of_test(tmp_path, tiny_model):
    cfg = config.load(write_project(tmp_path, tiny_model))
    path = build(cfg, 200, tmp_path / "scale")
    train_rows, test_rows = (pd.read_csv(path.parent / f"{n}.csv") for n in ("train", "test"))
    source = pd.read_csv(cfg.path(cfg.data.train))
    assert len(train_rows) == 200 and len(test_rows) == 50 and "label" not in test_rows
    assert train_rows["id"].is_unique and train_rows["body"].nunique() > source["body"].nunique()
    words = {" ".join(sorted(b.split())) for b in source["body"]}
    assert all(" ".join(sorted(b.split())) in words for b in train_rows["body"])  # the same words, reordered
    assert config.load(path).data.train_rows == 0
    failed = measured("comp.folds", ["--config", str(tmp_path / "missing.toml")], tmp_path)
    assert failed["rc"] != 0 and failed["peak_rss_gib"] > 0 and "missing.toml" in failed["error"][0]


def test_subsample_keeps_every_row_when_there_are_few():
    assert np.array_equal(baselines.subsample(np.array([0, 1, 2]), 3, 0), np.arange(3))


def test_a_level2_model_fits_on_a_stratified_sample_of_many_oof_rows(monkeypatch):
    from comp.classical import stacking

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    probs = [rng.dirichlet(np.ones(3), 400) for _ in range(2)]
    sizes = []
    monkeypatch.setattr(stacking.LogisticRegression, "fit", record_rows(stacking.LogisticRegression.fit, sizes))
    monkeypatch.setattr(stacking, "LEVEL2_ROWS", 150)
    stacker = stacking.fit("logistic", y, probs, 3, None, 0)
    assert sizes == [150] and stacker.predict(probs).shape == (400, 3)  # fitted on 150 rows, predicts all 400
