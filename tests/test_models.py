"""Whole models: a one-block transformer language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cpjax
from tests.helpers import assert_unbiased, reference_diag


def tiny_transformer(params, tokens):
    """Embedding lookup, layer norm, causal softmax attention and a log_softmax loss."""
    x = params["embed"][tokens[:-1]]
    mu = x.mean(-1, keepdims=True)
    x = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    q, k, v = x @ params["wq"], x @ params["wk"], x @ params["wv"]
    scores = q @ k.T / jnp.sqrt(q.shape[-1])
    scores = jnp.where(jnp.tril(jnp.ones_like(scores, bool)), scores, -1e9)
    x = x + jax.nn.softmax(scores) @ v
    logits = x @ params["unembed"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], 1))


def tiny_transformer_args(seed=2, vocab=23, width=4, length=7):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    params = {
        "embed": jax.random.normal(k[0], (vocab, width)),
        "wq": jax.random.normal(k[1], (width, width)) / 2,
        "wk": jax.random.normal(k[2], (width, width)) / 2,
        "wv": jax.random.normal(k[3], (width, width)) / 2,
        "unembed": jax.random.normal(k[4], (width, vocab)) / 2,
    }
    return params, jax.random.randint(k[5], (length,), 0, vocab)


def test_tiny_transformer_unbiased():
    """Vocabulary larger than the width: 2,000 probes, z = 6, fixed seed."""
    params, tokens = tiny_transformer_args()
    exact = reference_diag(tiny_transformer, (params, tokens))
    assert_unbiased(cpjax.cp_hessian_diag(tiny_transformer), (params, tokens), exact)


def test_tiny_transformer_unused_rows_zero():
    """Embedding rows of tokens that never occur get an exactly zero diagonal."""
    params, tokens = tiny_transformer_args()
    diag = cpjax.cp_hessian_diag(tiny_transformer)(params, tokens, key=jax.random.key(0))
    unused = jnp.setdiff1d(jnp.arange(23), tokens[:-1], size=23 - len(set(tokens[:-1].tolist())))
    assert jnp.all(diag["embed"][unused] == 0)
