"""Probe distributions (zero mean, identity covariance) and the keys they are drawn from.

Every equation that injects curvature draws its own probes, so one sweep draws from tens of
keys. With `jax.random.fold_in` and `jax.random.bits`, each draw is a threefry computation,
and on CPU compiling those took longer than compiling the rest of a one-probe sweep (2.5 s
against 0.9 s for a three-layer MLP). The sweep therefore derives its keys and its
Rademacher signs with a counter-based integer hash of the key's data: three integer
multiplications and four shifts per sign, which XLA fuses into the code that uses them.
The user's key keeps its meaning: the same key gives the same probes, and keys from
`jax.random.split` give independent-looking streams. Gaussian probes use
`jax.random.normal` on a derived key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpjax._reduce import sum_axes

PROBES = ("rademacher", "gaussian")

# Odd multipliers of the xor-shift-multiply hash below, and 2^32 divided by the golden ratio.
# tests/test_probes.py checks the statistics that CP relies on.
_MULTIPLY_1 = np.uint32(0x7FEB352D)
_MULTIPLY_2 = np.uint32(0x846CA68B)
_GOLDEN = np.uint32(0x9E3779B9)


def _mix(x):
    """Return a well-mixed 32-bit hash of each entry of the uint32 array `x`.

    Written with `lax` operations: the `jnp` operators trace through a cached jit wrapper
    each, and the sweep hashes at every equation that injects curvature.
    """
    x = lax.bitwise_xor(x, lax.shift_right_logical(x, np.uint32(16)))
    x = lax.mul(x, _MULTIPLY_1)
    x = lax.bitwise_xor(x, lax.shift_right_logical(x, np.uint32(15)))
    x = lax.mul(x, _MULTIPLY_2)
    return lax.bitwise_xor(x, lax.shift_right_logical(x, np.uint32(16)))


def _words(key):
    """Return the key's data as a list of uint32 scalars (2 for threefry, 4 for rbg)."""
    data = jax.random.key_data(key)
    return [data[..., i] for i in range(data.shape[-1])]


def fold(key, data):
    """Return a new key derived from `key` and the integer `data` (a cheap `fold_in`)."""
    words = _words(key)
    carry = _mix(jnp.asarray(data).astype(jnp.uint32) * _GOLDEN + np.uint32(0x632BE5AB))
    new = []
    for i, word in enumerate(words):
        carry = _mix(word ^ carry ^ np.uint32((i + 1) * int(_GOLDEN) % 2**32))
        new.append(carry)
    return jax.random.wrap_key_data(jnp.stack(new, axis=-1), impl=jax.random.key_impl(key))


def _seed(key, salt=0):
    """Return one uint32 word that depends on every word of the key and on `salt`.

    `salt` enters as a constant computed at trace time, so it adds no operations.
    """
    return _seed_of_words(_words(key), salt)


def _seed_of_words(words, salt):
    """Return `_seed` of a key given as its uint32 words (scalars, or arrays of many keys)."""
    seed = _mix(lax.bitwise_xor(words[0], _mix_constant(salt)))
    for word in words[1:]:
        seed = _mix(lax.bitwise_xor(seed, word))
    return seed


def _mix_constant(value: int):
    """Return `_mix` of a Python integer as a NumPy uint32, computed at trace time."""
    x = np.uint32(value * int(_GOLDEN) % 2**32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * _MULTIPLY_1
        x = x ^ (x >> np.uint32(15))
        x = x * _MULTIPLY_2
        return x ^ (x >> np.uint32(16))


def _rademacher(key, shape, dtype, salt=0):
    """Return ±1 entries drawn from `key` and `salt`; see `rademacher_from_seed`."""
    return rademacher_from_seed(_seed(key, salt), shape, dtype)


def seed_table(keys, num_salts: int):
    """Return `_seed(keys[i], salt)` for a table of keys, with shape (len(keys), num_salts).

    Computed for every key and salt at once, so that a draw costs one slice of the table
    instead of the mixing of the key's words.
    """
    words = _words(keys)
    return jnp.stack([_seed_of_words(words, salt) for salt in range(num_salts)], axis=-1)


def rademacher_from_seed(seed, shape, dtype):
    """Return ±1 entries: the top bit of a hash of each entry's index, keyed by `seed`.

    `seed` is a uint32 scalar from `_seed` or an entry of `seed_table`.

    There is one hash per entry, not one per 32 entries with a shift and a mask for each.
    XLA fuses the draw into the code that multiplies by it, and there the shared form
    recomputed each entry's word anyway. In runs of both forms in one process, ten probes on
    the suite's 10k MLP took 3.0 against 4.9 ms, and on its 0.5M transformer 88 against
    106 ms. The CNNs ran at the same speed with either form.
    """
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(
            f"cpjax draws Rademacher probes by a 32-bit counter, so one draw has at most 2^32 "
            f"entries; got shape {shape} ({size:,} entries). Pass a smaller sample_chunk_size "
            "(the leading axis counts probes), or probe='gaussian'.")
    index = lax.iota(jnp.uint32, size).reshape(shape)
    hashed = _mix(lax.bitwise_xor(lax.mul(index, _GOLDEN), seed))
    negative = lax.shift_right_logical(hashed, np.uint32(31)).astype(dtype)
    return lax.sub(np.array(1, dtype), lax.mul(negative, np.array(2, dtype)))


def draw(key, shape, dtype, kind: str, salt: int = 0):
    """Draw probes of `shape` and `dtype`: entries ±1 ("rademacher") or N(0, 1) ("gaussian").

    Each Python integer `salt` gives an independent draw from the same key.
    """
    if kind == "rademacher":
        return _rademacher(key, shape, dtype, salt)
    if kind == "gaussian":
        return jax.random.normal(fold(key, salt) if salt else key, shape, dtype=dtype)
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")


def leading_sum(x, n: int = 1, scale: float = 1.0):
    """Return the sum of `x` over its `n` leading axes (the probes, and examples after them).

    Computed as a product with a vector of ones (`cpjax._reduce.sum_axes`, which also sets
    the precision and the scale): XLA's CPU backend reduced over a leading axis 15 to 30
    times slower (3.2 ms against 0.2 ms for 10 probes of 49,152 entries).
    """
    lead = math.prod(x.shape[:n])
    if lead == 1:
        out = x.reshape(x.shape[n:])
        return out if scale == 1.0 else (out * scale).astype(x.dtype)
    return sum_axes(x.reshape(lead, -1), (0,), scale=scale).reshape(x.shape[n:])


def probe_mean(x):
    """Return the mean of `x` over its leading (probe) axis; see `leading_sum`."""
    return leading_sum(x, 1, 1.0 / x.shape[0])
