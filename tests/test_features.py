import numpy as np
import pandas as pd

from comp.tables.features import MetaEncoder


def frame():
    return pd.DataFrame({"shop": ["a", "b", None, "a"], "count": [1.0, 3.0, np.nan, 100.0]})


def test_onehot_missing_category_and_median_scaling():
    df = frame()
    enc = MetaEncoder(("shop",), ("count",)).fit(df.iloc[:3])
    x = enc.transform(df.iloc[:3])
    assert enc.width == 4 and x.dtype == np.float32  # a, b, <missing>, count
    assert x[:, :3].sum(1).tolist() == [1, 1, 1]
    # median imputation (2.0) then standardisation of the fit rows [1, 3, 2]
    assert np.allclose(x[:, 3], (np.array([1, 3, 2]) - 2) / np.std([1, 3, 2]), atol=1e-6)


def test_unseen_category_is_all_zero_and_counted():
    enc = MetaEncoder(("shop",), ()).fit(frame().iloc[:2])
    test = pd.DataFrame({"shop": ["a", "zzz", "zzz"]})
    assert enc.transform(test)[1:].sum() == 0
    assert enc.unseen(test) == {"shop": 2}


def test_transforms_equal_scikit_learns_on_skewed_values_rare_and_unseen_categories():
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import MissingIndicator, SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, QuantileTransformer

    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"c": rng.choice(list("aabbbcdefg"), n), "x": np.exp(rng.normal(0, 2, n)),
                       "y": rng.integers(0, 5, n).astype(float)})
    df.loc[::7, "x"] = np.nan
    later = pd.DataFrame({"c": ["a", "zz", "g"], "x": [df["x"].max() * 2, np.nan, 0.0], "y": [-1.0, 2.0, 9.0]})
    ours = MetaEncoder(("c",), ("x", "y"), min_category_rows=20, numeric_transform="quantile").fit(df)
    sk = ColumnTransformer([
        ("cat", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=20, sparse_output=False), ["c"]),
        ("num", make_pipeline(SimpleImputer(strategy="median"), QuantileTransformer(n_quantiles=300,
                                                                                     output_distribution="normal")),
         ["x", "y"]),
        ("missing", MissingIndicator(error_on_new=False), ["x", "y"])]).fit(df)
    for rows in (df, later):
        assert ours.transform(rows).shape[1] == ours.width
        assert np.allclose(ours.transform(rows), sk.transform(rows), atol=1e-5)


def test_no_metadata_columns():
    enc = MetaEncoder((), ()).fit(frame())
    assert enc.width == 0 and enc.transform(frame()).shape == (4, 0)


def test_save_load_round_trip(tmp_path):
    enc = MetaEncoder(("shop",), ("count",)).fit(frame())
    enc.save(tmp_path / "e.json")
    assert np.array_equal(MetaEncoder.load(tmp_path / "e.json").transform(frame()), enc.transform(frame()))


def test_artifacts_are_not_private_files(tmp_path):
    import os

    from comp.artifacts import write_text

    write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
