"""Metadata encoders, fitted on a fold's training rows: one-hot categoricals (values seen in fewer than
model.min_category_rows rows share one "rare" column), numerics median-imputed with a missing-value indicator,
then mapped to a normal distribution by their quantiles (model.numeric_transform = "quantile") or standardized."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, QuantileTransformer, StandardScaler

from comp.artifacts import atomic_path
from comp.config import Config
from comp.data import MISSING
from comp.errors import CompError


def prepare_columns(df: pd.DataFrame, categorical: tuple[str, ...], numeric: tuple[str, ...]) -> pd.DataFrame:
    """The metadata columns as encoders take them: categoricals as strings (missing: its own value), numerics
    as floats (missing: NaN)."""
    out = pd.DataFrame(index=df.index)
    for col in categorical:
        out[col] = df[col].map(lambda v: MISSING if pd.isna(v) else str(v)).astype(object)
    for col in numeric:
        out[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return out


class MetaEncoder:
    """Turns the metadata columns of a table into a float32 matrix; zero columns give width 0."""

    def __init__(self, categorical: tuple[str, ...], numeric: tuple[str, ...], min_category_rows: int = 1,
                 numeric_transform: str = "standard"):
        self.categorical, self.numeric = tuple(categorical), tuple(numeric)
        self.min_category_rows, self.numeric_transform = min_category_rows, numeric_transform
        self.transformer: ColumnTransformer | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> MetaEncoder:
        """The encoder the config describes (columns from [data], encodings from [model])."""
        return cls(cfg.data.categorical, cfg.data.numeric, cfg.model.min_category_rows, cfg.model.numeric_transform)

    def fit(self, df: pd.DataFrame) -> MetaEncoder:
        """Fit on the given rows only (a fold's training part)."""
        parts = []
        if self.categorical:
            rare = self.min_category_rows > 1  # rare and unseen values go to one shared column
            onehot = OneHotEncoder(handle_unknown="infrequent_if_exist" if rare else "ignore", sparse_output=False,
                                   min_frequency=self.min_category_rows if rare else None)
            parts.append(("cat", onehot, list(self.categorical)))
        if self.numeric:
            quantile = self.numeric_transform == "quantile"
            scale = (QuantileTransformer(n_quantiles=min(1000, len(df)), output_distribution="normal", subsample=None)
                     if quantile else StandardScaler())
            parts.append(("num", make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), scale),
                          list(self.numeric)))
            if quantile:  # a 0/1 column for each numeric column with missing values in these rows
                parts.append(("missing", MissingIndicator(error_on_new=False), list(self.numeric)))
        if parts:
            self.transformer = ColumnTransformer(parts).fit(self._prepare(df))
        return self

    @property
    def width(self) -> int:
        if self.transformer is None:
            return 0
        return len(self.transformer.get_feature_names_out())

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode rows; categories unseen at fit time encode to all zeros."""
        if self.transformer is None:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.asarray(self.transformer.transform(self._prepare(df)), dtype=np.float32)

    def unseen(self, df: pd.DataFrame) -> dict[str, int]:
        """How many rows of df hold a category the encoder never saw, per categorical column."""
        if not self.categorical or self.transformer is None:
            return {}
        onehot = self.transformer.named_transformers_["cat"]
        prepared = self._prepare(df)
        return {col: int((~prepared[col].isin(cats)).sum())
                for col, cats in zip(self.categorical, onehot.categories_, strict=True)}

    def _prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        return prepare_columns(df, self.categorical, self.numeric)

    def save(self, path: Path) -> None:
        """Write the fitted encoder with joblib, atomically."""
        with atomic_path(path) as tmp:
            joblib.dump(self, tmp)

    @staticmethod
    def load(path: Path) -> MetaEncoder:
        """Read an encoder comp wrote."""
        try:
            enc = joblib.load(path)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken artifact
            raise CompError(f"{path} is unreadable ({exc.__class__.__name__}); retrain that fold with --force") from None
        if not isinstance(enc, MetaEncoder):
            raise CompError(f"{path} does not hold a comp metadata encoder; retrain that fold with --force")
        return enc
