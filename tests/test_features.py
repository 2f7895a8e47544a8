import numpy as np
import pandas as pd

from comp.features import MetaEncoder


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


def test_no_metadata_columns():
    enc = MetaEncoder((), ()).fit(frame())
    assert enc.width == 0 and enc.transform(frame()).shape == (4, 0)


def test_save_load_round_trip(tmp_path):
    enc = MetaEncoder(("shop",), ("count",)).fit(frame())
    enc.save(tmp_path / "e.joblib")
    assert np.array_equal(MetaEncoder.load(tmp_path / "e.joblib").transform(frame()), enc.transform(frame()))


def test_artifacts_are_not_private_files(tmp_path):
    import os

    from comp.artifacts import write_text

    write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
