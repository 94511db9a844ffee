"""The probe generator: ±1 entries with zero mean and identity covariance, keyed like JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpjax
from cpjax import _probes

Z = 6.0  # every statistic below must lie within six standard errors of its target


def signs(key, shape=(4096, 64)):
    return np.asarray(_probes.draw(key, shape, jnp.float32, "rademacher"))


def test_rademacher_entries_are_signs():
    v = signs(jax.random.key(0))
    assert set(np.unique(v)) == {-1.0, 1.0}


def test_rademacher_mean_zero_per_coordinate():
    v = signs(jax.random.key(1))
    # Each coordinate's mean over 4096 draws has standard error 1 / 64.
    assert np.max(np.abs(v.mean(axis=0))) < Z / np.sqrt(v.shape[0])


def test_rademacher_identity_covariance():
    v = signs(jax.random.key(2))
    covariance = v.T @ v / v.shape[0]
    off_diagonal = covariance[~np.eye(v.shape[1], dtype=bool)]
    np.testing.assert_array_equal(np.diagonal(covariance), 1.0)
    assert np.max(np.abs(off_diagonal)) < Z / np.sqrt(v.shape[0])


def test_folded_keys_uncorrelated():
    """Probes of neighbouring equations (fold by 0, 1, ...) do not repeat or correlate."""
    key = jax.random.key(3)
    draws = np.stack([signs(_probes.fold(key, i), (4096,)) for i in range(16)])
    correlation = draws @ draws.T / draws.shape[1]
    off_diagonal = correlation[~np.eye(16, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < Z / np.sqrt(draws.shape[1])


def test_split_keys_uncorrelated():
    keys = jax.random.split(jax.random.key(4), 16)
    draws = np.stack([signs(k, (4096,)) for k in keys])
    correlation = draws @ draws.T / draws.shape[1]
    off_diagonal = correlation[~np.eye(16, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < Z / np.sqrt(draws.shape[1])


def test_same_key_same_probes():
    key = _probes.fold(jax.random.key(5), 7)
    np.testing.assert_array_equal(signs(key), signs(key))


def test_fold_traced_and_vmapped_matches_eager():
    key = jax.random.key(6)
    eager = jnp.stack([jax.random.key_data(_probes.fold(key, i)) for i in range(4)])
    vmapped = jax.vmap(lambda i: jax.random.key_data(_probes.fold(key, i)))(jnp.arange(4))
    np.testing.assert_array_equal(vmapped, eager)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_key_implementations_supported(impl):
    key = jax.random.key(7, impl=impl)
    v = signs(_probes.fold(key, 1), (4096,))
    assert abs(v.mean()) < Z / np.sqrt(v.size)
    assert jax.random.key_impl(_probes.fold(key, 1)) == jax.random.key_impl(key)


def test_gaussian_moments():
    v = np.asarray(_probes.draw(jax.random.key(8), (20000,), jnp.float64, "gaussian"))
    assert abs(v.mean()) < Z / np.sqrt(v.size)
    assert abs(v.var() - 1.0) < Z * np.sqrt(2.0 / v.size)


@pytest.mark.parametrize("lead", [1, 2])
@pytest.mark.parametrize("shape", [(1, 3, 4), (5, 3, 4), (7, 2, 3, 2)])
def test_leading_sum_matches_numpy(shape, lead):
    x = np.asarray(jax.random.normal(jax.random.key(9), shape, jnp.float64))
    np.testing.assert_allclose(_probes.leading_sum(jnp.asarray(x), lead),
                               x.sum(axis=tuple(range(lead))), rtol=1e-12)
    np.testing.assert_allclose(_probes.probe_mean(jnp.asarray(x)), x.mean(axis=0), rtol=1e-12)


def test_leading_sum_bfloat16_in_float32():
    """300 ones summed in bfloat16 would stop at 256, where adding one is lost to rounding."""
    x = jnp.ones((300, 2), jnp.bfloat16)
    total = _probes.leading_sum(x)
    assert total.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(total, np.float32), [300.0, 300.0])
    assert _probes.probe_mean(x).dtype == jnp.bfloat16


def test_probe_mean_float16_no_overflow():
    """20,000 probes of 9 each sum to 180,000, above float16's largest value 65,504."""
    x = jnp.full((20000, 2), 9.0, jnp.float16)
    mean = _probes.probe_mean(x)
    assert mean.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(mean, np.float32), [9.0, 9.0])


def test_salted_draws_uncorrelated():
    key = _probes.fold(jax.random.key(10), 3)
    draws = np.stack([np.asarray(_probes.draw(key, (4096,), jnp.float32, "rademacher", salt))
                      for salt in range(8)])
    correlation = draws @ draws.T / draws.shape[1]
    off_diagonal = correlation[~np.eye(8, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < Z / np.sqrt(draws.shape[1])
    assert np.max(np.abs(draws.mean(axis=1))) < Z / np.sqrt(draws.shape[1])


def lagged_correlations(a, b, max_lag):
    """Return the correlations of `a[i]` with `b[i + lag]` for |lag| ≤ max_lag.

    Lag 0 is left out when `a` is `b`.
    """
    n = a.size
    fa = np.fft.rfft(np.concatenate([a, np.zeros(n)]))
    fb = np.fft.rfft(np.concatenate([b, np.zeros(n)]))
    full = np.fft.irfft(np.conj(fa) * fb, 2 * n) / n
    lags = np.concatenate([full[1:max_lag + 1], full[-max_lag:]])
    return lags if a is b else np.concatenate([full[:1], lags])


def test_rademacher_no_shifted_repeats():
    """A stream, and the streams of neighbouring equations, do not repeat at a shift.

    A counter hash whose key only offsets the counter would repeat another key's signs at
    a shift, with a correlation near 1. Over 4,097 lags of 16,384 independent signs, the
    largest |z| is an estimated 4.5.
    """
    key = jax.random.key(11)
    draws = [signs(_probes.fold(key, i), (16384,)).astype(np.float64) for i in range(4)]
    bound = Z / np.sqrt(draws[0].size)
    assert np.max(np.abs(lagged_correlations(draws[0], draws[0], 2048))) < bound
    for other in draws[1:]:
        assert np.max(np.abs(lagged_correlations(draws[0], other, 2048))) < bound


def test_rademacher_too_many_entries_raises():
    """The 32-bit counter would repeat signs, so a larger draw is an error, not a repeat."""
    with pytest.raises(ValueError, match="at most 2\\^32 entries"):
        _probes.draw(jax.random.key(12), (2**16, 2**16 + 1), jnp.float32, "rademacher")


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_seed_table_matches_seeds_of_keys(impl):
    keys = _probes.fold(jax.random.key(4, impl=impl), jnp.arange(5, dtype=jnp.uint32))
    table = _probes.seed_table(keys, 2)
    assert table.shape == (5, 2)
    for i in range(5):
        for salt in range(2):
            assert table[i, salt] == _probes._seed(keys[i], salt)
    drawn = _probes.rademacher_from_seed(table[3, 1], (4, 7), jnp.float32)
    np.testing.assert_array_equal(drawn, _probes._rademacher(keys[3], (4, 7), jnp.float32, 1))


def test_sweep_seed_table_keeps_probes(monkeypatch):
    # The sweep reads most seeds from a table. Drawn from each equation's key instead, the
    # probes, and so the estimate, must be the same.
    from cpjax import _sweep

    def fun(x):
        return jnp.sum(jnp.tanh(x) * jnp.sin(x[::-1]) + x ** 3 / (1 + x ** 2))

    def estimate():
        return cpjax.cp_hessian_diag(lambda x: fun(x), num_samples=3)(
            jnp.linspace(-1.0, 1.0, 6), key=jax.random.key(2))

    key_draws = []
    draw_from_key = _probes._rademacher

    def counted_draw(*args):
        key_draws.append(args[1])
        return draw_from_key(*args)

    monkeypatch.setattr(_probes, "_rademacher", counted_draw)
    tabled = estimate()
    assert key_draws == []
    untabled_keys = _sweep._node_key_table
    monkeypatch.setattr(_sweep, "_node_key_table",
                        lambda key, n: (untabled_keys(key, n)[0], None))
    from_keys = estimate()
    assert len(key_draws) >= 3
    np.testing.assert_array_equal(tabled, from_keys)
    assert np.abs(tabled).max() > 0
