"""Metadata encoders: one-hot categoricals, imputed + standardized numerics; fitted on a fold's training rows."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from comp.artifacts import atomic_path
from comp.data import MISSING
from comp.errors import CompError


class MetaEncoder:
    """Turns the metadata columns of a table into a float32 matrix; zero columns give width 0."""

    def __init__(self, categorical: tuple[str, ...], numeric: tuple[str, ...]):
        self.categorical, self.numeric = tuple(categorical), tuple(numeric)
        self.transformer: ColumnTransformer | None = None

    def fit(self, df: pd.DataFrame) -> MetaEncoder:
        """Fit on the given rows only (a fold's training part)."""
        parts = []
        if self.categorical:
            parts.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(self.categorical)))
        if self.numeric:
            parts.append(("num", make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                                               StandardScaler()), list(self.numeric)))
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
        out = pd.DataFrame(index=df.index)
        for col in self.categorical:
            out[col] = df[col].map(lambda v: MISSING if pd.isna(v) else str(v)).astype(object)
        for col in self.numeric:
            out[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
        return out

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
