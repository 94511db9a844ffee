"""Functions that model problems reported against other Hessian-diagonal tools."""

import jax
import jax.numpy as jnp


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# An in-place update (scatter) in the middle of the computation.
def scatter_update(x):
    y = jnp.sin(x)
    y = y.at[2].set(jnp.exp(x[0]) * x[1])
    y = y.at[jnp.array([0, 3])].add(x[4] ** 3)
    return jnp.sum(jnp.tanh(y) ** 2)


def scatter_update_args(seed=4, n=6):
    return (0.8 * jax.random.normal(_keys(seed, 1)[0], (n,)),)


# Attention on a single input: both operands of each product depend on the same leaf, so
# the bilinear cross terms reach the diagonal and may not be pruned.
def self_attention_power(x):
    return jnp.sum(jnp.exp(x @ x.T / x.shape[1]) @ x)


def self_attention_power_args(seed=5, rows=3, columns=3):
    return (0.5 * jax.random.normal(_keys(seed, 1)[0], (rows, columns)),)


# A coupled function on which applying an elementwise second derivative twice gives the
# wrong diagonal: every coordinate interacts with every other.
def coupled_cubic(x):
    return jnp.sum(x) ** 3 + jnp.sum(x**2)


def coupled_cubic_args(seed=7, n=5):
    return (jax.random.normal(_keys(seed, 1)[0], (n,)),)


# The same weight used at several places (a tied embedding and a shared layer applied
# twice): cross terms between the uses reach the diagonal.
def weight_sharing(params, x):
    h = jnp.tanh(x @ params["w"])
    h = jnp.tanh(h @ params["w"].T)
    return jnp.sum(h**2) + jnp.sum(params["w"] * params["w"] * params["w"])


def weight_sharing_args(seed=3, batch=4, d=3, width=5):
    k = _keys(seed, 2)
    return {"w": jax.random.normal(k[0], (d, width)) / 2}, jax.random.normal(k[1], (batch, d))
