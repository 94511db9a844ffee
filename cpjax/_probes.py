"""Probe distributions: zero mean, identity covariance."""

from __future__ import annotations

import jax

PROBES = ("rademacher", "gaussian")


def draw(key, shape, dtype, kind: str):
    """Draw probes of `shape` and `dtype`: entries ±1 ("rademacher") or N(0, 1) ("gaussian")."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype=dtype)
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")
