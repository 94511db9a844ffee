"""Probe distributions: zero mean, identity covariance."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PROBES = ("rademacher", "gaussian")


def _rademacher(key, shape, dtype):
    """±1 entries, 32 of them from each random 32-bit word.

    `jax.random.rademacher` spends one word per entry; on CPU, drawing the probes for a
    hidden layer that way took longer than the layer's matrix products.
    """
    n = math.prod(shape)
    words = jax.random.bits(key, ((n + 31) // 32,), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(-1)[:n].astype(dtype) - 1).reshape(shape)


def draw(key, shape, dtype, kind: str):
    """Draw probes of `shape` and `dtype`: entries ±1 ("rademacher") or N(0, 1) ("gaussian")."""
    if kind == "rademacher":
        return _rademacher(key, shape, dtype)
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype=dtype)
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")
