"""Metadata encoders, fitted on a fold's training rows:
- categoricals one-hot, a missing value being its own value; values seen in fewer than model.min_category_rows
  rows share one "rare" column, which unseen values join (without rare values, unseen ones encode to zeros);
- numerics median-imputed, then mapped to a normal distribution by their quantiles with a 0/1 column for each
  column that had missing values (model.numeric_transform = "quantile"), or standardized ("standard").
The fitted state is plain numbers and strings, saved as JSON: an encoder is never unpickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtri
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from comp.artifacts import read_json, write_json
from comp.config import Config
from comp.errors import CompError
from comp.tables.read import category, mostly_unseen

FORMAT = 1
BOUNDS = 1e-7  # scikit-learn's QuantileTransformer clips the normal's tails at these probabilities


def prepare_columns(df: pd.DataFrame, categorical: tuple[str, ...], numeric: tuple[str, ...]) -> pd.DataFrame:
    """The metadata columns as encoders take them: categoricals as strings (missing: its own value), numerics
    as floats (missing: NaN)."""
    out = pd.DataFrame(index=df.index)
    for col in categorical:
        out[col] = df[col].map(category).astype(object)
    for col in numeric:
        out[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return out


def quantile_normal(x: np.ndarray, quantiles: np.ndarray, references: np.ndarray) -> np.ndarray:
    """scikit-learn's QuantileTransformer(output_distribution="normal").transform of one column without NaN."""
    lower, upper = x == quantiles[0], x == quantiles[-1]
    p = 0.5 * (np.interp(x, quantiles, references) - np.interp(-x, -quantiles[::-1], -references[::-1]))
    p[upper], p[lower] = 1.0, 0.0
    return np.clip(ndtri(p), ndtri(BOUNDS - np.spacing(1)), ndtri(1 - (BOUNDS - np.spacing(1))))


class MetaEncoder:
    """Turns the metadata columns of a table into a float32 matrix; zero columns give width 0."""

    def __init__(self, categorical: tuple[str, ...], numeric: tuple[str, ...], min_category_rows: int = 1,
                 numeric_transform: str = "standard"):
        self.categorical, self.numeric = tuple(categorical), tuple(numeric)
        self.min_category_rows, self.numeric_transform = min_category_rows, numeric_transform
        self.state: dict | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> MetaEncoder:
        """The encoder the config describes (columns from [data], encodings from [model])."""
        return cls(cfg.data.categorical, cfg.data.numeric, cfg.model.min_category_rows, cfg.model.numeric_transform)

    def fit(self, df: pd.DataFrame) -> MetaEncoder:
        """Fit on the given rows only (a fold's training part)."""
        cols = prepare_columns(df, self.categorical, self.numeric)
        state: dict = {"categorical": [], "numeric": {}}
        for col in self.categorical:
            counts = cols[col].value_counts()
            kept = sorted(v for v, n in counts.items() if n >= self.min_category_rows)
            rare = sorted(v for v, n in counts.items() if n < self.min_category_rows)
            state["categorical"].append({"column": col, "values": kept, "rare_values": rare})
        if self.numeric:
            x = cols[list(self.numeric)].to_numpy(dtype=float)
            missing = np.isnan(x)
            medians = np.where(missing.all(0), 0.0, np.nanmedian(np.where(missing.all(0), 0.0, x), axis=0))
            filled = np.where(missing, medians, x)
            num = {"medians": medians.tolist(), "transform": self.numeric_transform}
            if self.numeric_transform == "quantile":
                qt = QuantileTransformer(n_quantiles=min(1000, len(df)), output_distribution="normal",
                                         subsample=None).fit(filled)
                num.update(quantiles=qt.quantiles_.T.tolist(), references=qt.references_.tolist(),
                           indicators=np.flatnonzero(missing.any(0)).tolist())
            else:
                scaler = StandardScaler().fit(filled)
                num.update(mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist())
            state["numeric"] = num
        self.state = state
        return self

    @property
    def width(self) -> int:
        if self.state is None:
            return 0
        cats = sum(len(c["values"]) + bool(c["rare_values"]) for c in self.state["categorical"])
        return cats + len(self.numeric) + len(self.state["numeric"].get("indicators", []))

    def feature_names(self) -> list[str]:
        """A name for each column transform() writes: column=value (column=<rare>), the numerics, "<column>
        missing" for the indicators."""
        if self.state is None:
            raise CompError("the metadata encoder is not fitted")
        names = []
        for c in self.state["categorical"]:
            names += [f"{c['column']}={v}" for v in c["values"]] + ([f"{c['column']}=<rare>"] if c["rare_values"] else [])
        names += list(self.numeric)
        return names + [f"{self.numeric[i]} missing" for i in self.state["numeric"].get("indicators", []) or []]

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode rows: one-hot blocks, then the numerics, then the missing-value indicators."""
        if self.state is None:
            raise CompError("the metadata encoder is not fitted")
        cols = prepare_columns(df, self.categorical, self.numeric)
        parts = [np.zeros((len(df), 0))]
        for c in self.state["categorical"]:
            index = {v: i for i, v in enumerate(c["values"])}
            block = np.zeros((len(df), len(index) + bool(c["rare_values"])))
            pos = cols[c["column"]].map(index)
            known = pos.notna().to_numpy()
            block[np.flatnonzero(known), pos[known].to_numpy(dtype=int)] = 1.0
            if c["rare_values"]:
                block[~known, -1] = 1.0
            parts.append(block)
        if self.numeric:
            parts += self._numeric(cols[list(self.numeric)].to_numpy(dtype=float))
        return np.hstack(parts).astype(np.float32)

    def _numeric(self, x: np.ndarray) -> list[np.ndarray]:
        num = self.state["numeric"]
        missing = np.isnan(x)
        filled = np.where(missing, np.asarray(num["medians"]), x)
        if num["transform"] == "standard":
            return [(filled - np.asarray(num["mean"])) / np.asarray(num["scale"])]
        references = np.asarray(num["references"])
        values = np.column_stack([quantile_normal(filled[:, j], np.asarray(q), references)
                                  for j, q in enumerate(num["quantiles"])])
        return [values, missing[:, num["indicators"]].astype(float)]

    def unseen(self, df: pd.DataFrame) -> dict[str, int]:
        """How many rows of df hold a category the encoder never saw, per categorical column."""
        if self.state is None:
            return {}
        cols = prepare_columns(df, self.categorical, ())
        return {c["column"]: int((~cols[c["column"]].isin(set(c["values"]) | set(c["rare_values"]))).sum())
                for c in self.state["categorical"]}

    def check_seen(self, df: pd.DataFrame, where: str) -> None:
        """Refuse rows most of whose values in a categorical column this encoder never saw (tables.mostly_unseen)."""
        for c in (self.state or {}).get("categorical", []):
            mostly_unseen(c["column"], set(c["values"]) | set(c["rare_values"]), df[c["column"]], where)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "categorical": list(self.categorical), "numeric": list(self.numeric),
                "min_category_rows": self.min_category_rows, "numeric_transform": self.numeric_transform,
                "state": self.state}

    @classmethod
    def from_dict(cls, d: dict) -> MetaEncoder:
        enc = cls(tuple(d["categorical"]), tuple(d["numeric"]), d["min_category_rows"], d["numeric_transform"])
        enc.state = d["state"]
        return enc

    def save(self, path: Path) -> None:
        """Write the fitted encoder as JSON, atomically."""
        write_json(path, self.to_dict())

    @staticmethod
    def load(path: Path) -> MetaEncoder:
        """Read an encoder comp wrote (JSON)."""
        d = read_json(path)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CompError(f"{path} is not a comp metadata encoder of format {FORMAT}: retrain that fold with --force")
        try:
            return MetaEncoder.from_dict(d)
        except (KeyError, TypeError) as exc:
            raise CompError(f"{path} lacks {exc}: retrain that fold with --force") from None
