"""Curvature Propagation on models written with flax (linen and nnx) and equinox.

Each library gets an MLP, a small CNN with max and average pooling, and a transformer block
(embedding, layer norm, causal multi-head attention, tied unembedding). The diagonal is
taken with respect to each library's usual parameter pytree: linen's `params` collection,
the `nnx.Param` state from `nnx.split`, and the array half of
`eqx.partition(model, eqx.is_array)`. The estimate must average to the float64
`jax.hessian` diagonal (`assert_unbiased`: 2,000 single-probe estimates, z = 6, fixed seed)
and have the structure, shapes and dtypes of the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen as nn
from flax import nnx

import cpjax
from tests.helpers import assert_unbiased, reference_diag

F64 = jnp.float64
BATCH = 4
CLASSES = 3
IMAGE = 6  # side of the square one-channel images of the CNNs
VOCAB = 7
WIDTH = 4  # model width of the transformer blocks
HEADS = 2
LENGTH = 5  # tokens per sequence, each predicted from the ones before it


@dataclasses.dataclass(frozen=True)
class Problem:
    """A scalar loss `loss(params, *data)` with the parameters and data to evaluate it at."""

    loss: Callable
    params: object
    data: tuple


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def mean_cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mean_squared_error(outputs, targets):
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def classification_data(seed, feature_shape):
    k = _keys(seed, 2)
    x = jax.random.normal(k[0], (BATCH, *feature_shape), F64)
    return x, jax.random.randint(k[1], (BATCH,), 0, CLASSES)


def regression_data(seed, features):
    k = _keys(seed, 2)
    x = jax.random.normal(k[0], (BATCH, features), F64)
    return x, jax.random.normal(k[1], (BATCH, CLASSES), F64)


def token_data(seed):
    return (jax.random.randint(jax.random.key(seed), (BATCH, LENGTH), 0, VOCAB),)


def next_token_loss(logits, tokens):
    """Return the mean cross-entropy of predicting each token from the ones before it."""
    return mean_cross_entropy(logits[:, :-1], tokens[:, 1:])


# --- flax linen ----------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, param_dtype=F64)(x))
        x = nn.softplus(nn.Dense(6, param_dtype=F64)(x))
        return nn.Dense(CLASSES, param_dtype=F64)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3), param_dtype=F64)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.tanh(nn.Conv(4, (2, 2), padding="VALID", param_dtype=F64)(x))
        x = nn.avg_pool(x, (2, 2))
        return nn.Dense(CLASSES, param_dtype=F64)(x.reshape(x.shape[0], -1))


class LinenBlock(nn.Module):
    """Pre-norm transformer block with a tied embedding and a causal mask."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(VOCAB, WIDTH, param_dtype=F64)
        x = embed(tokens)
        h = nn.LayerNorm(param_dtype=F64)(x)
        attention = nn.MultiHeadDotProductAttention(HEADS, param_dtype=F64, deterministic=True)
        x = x + attention(h, h, mask=nn.make_causal_mask(tokens))
        return embed.attend(nn.LayerNorm(param_dtype=F64)(x))


class LinenTanhLayer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.width, param_dtype=F64)(x))


class LinenRematMLP(nn.Module):
    """Two hidden layers, each rematerialized in the backward pass by `nn.remat`."""

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(LinenTanhLayer)
        x = layer(8)(layer(8)(x))
        return nn.Dense(CLASSES, param_dtype=F64)(x)


def linen_problem(module, data, head):
    """Build the `Problem` of `head(module.apply(params, inputs), targets)`."""
    params = module.init(jax.random.key(0), data[0])["params"]

    def loss(params, inputs, *targets):
        return head(module.apply({"params": params}, inputs), *targets)

    return Problem(loss, params, data)


def linen_mlp():
    return linen_problem(LinenMLP(), classification_data(1, (5,)), mean_cross_entropy)


def linen_cnn():
    data = classification_data(2, (IMAGE, IMAGE, 1))
    return linen_problem(LinenCNN(), data, mean_cross_entropy)


def linen_block():
    tokens = token_data(3)
    return linen_problem(LinenBlock(), tokens, lambda logits: next_token_loss(logits, *tokens))


def linen_remat_mlp():
    return linen_problem(LinenRematMLP(), regression_data(4, 5), mean_squared_error)


# --- flax nnx ------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, features, rngs):
        self.hidden1 = nnx.Linear(features, 8, param_dtype=F64, rngs=rngs)
        self.hidden2 = nnx.Linear(8, 6, param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(6, CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.hidden1(x))
        return self.out(nnx.softplus(self.hidden2(x)))


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 3, (3, 3), param_dtype=F64, rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (2, 2), padding="VALID", param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(4, CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jnp.tanh(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.avg_pool(jnp.tanh(self.conv2(x)), (2, 2))
        return self.out(x.reshape(x.shape[0], -1))


class NnxBlock(nnx.Module):
    """Pre-norm transformer block with a tied embedding and a causal mask.

    nnx's attention calls `jax.nn.dot_product_attention`, which computes the softmax in
    float32 (jax 0.10.2), so this block also has float32 values inside a float64 loss.
    """

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, param_dtype=F64, rngs=rngs)
        self.norm1 = nnx.LayerNorm(WIDTH, param_dtype=F64, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            HEADS, WIDTH, param_dtype=F64, decode=False, deterministic=True, rngs=rngs)
        self.norm2 = nnx.LayerNorm(WIDTH, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, mask=nnx.make_causal_mask(tokens))
        return self.embed.attend(self.norm2(x))


def nnx_problem(module, data, head):
    """Build the `Problem` for `module` split into graph, `nnx.Param` state and the rest."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, inputs, *targets):
        model = nnx.merge(graphdef, params, rest)
        return head(model(inputs), *targets)

    return Problem(loss, params, data)


def nnx_mlp():
    return nnx_problem(NnxMLP(5, nnx.Rngs(0)), classification_data(1, (5,)), mean_cross_entropy)


def nnx_cnn():
    data = classification_data(2, (IMAGE, IMAGE, 1))
    return nnx_problem(NnxCNN(nnx.Rngs(0)), data, mean_cross_entropy)


def nnx_block():
    tokens = token_data(3)
    return nnx_problem(NnxBlock(nnx.Rngs(0)), tokens,
                       lambda logits: next_token_loss(logits, *tokens))


# --- equinox -------------------------------------------------------------------------------


class EqxMLP(eqx.Module):
    layers: tuple

    def __init__(self, features, key):
        k = jax.random.split(key, 3)
        self.layers = (eqx.nn.Linear(features, 8, key=k[0]), eqx.nn.Linear(8, 6, key=k[1]),
                       eqx.nn.Linear(6, CLASSES, key=k[2]))

    def __call__(self, x):
        x = jnp.tanh(self.layers[0](x))
        return self.layers[2](jax.nn.softplus(self.layers[1](x)))


class EqxCNN(eqx.Module):
    """The CNN on one channels-first image, because equinox layers take unbatched inputs."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    max_pool: eqx.nn.MaxPool2d
    avg_pool: eqx.nn.AvgPool2d
    out: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 3, 3, padding=1, key=k[0])
        self.max_pool = eqx.nn.MaxPool2d(2, stride=2)
        self.conv2 = eqx.nn.Conv2d(3, 4, 2, key=k[1])
        self.avg_pool = eqx.nn.AvgPool2d(2)
        self.out = eqx.nn.Linear(4, CLASSES, key=k[2])

    def __call__(self, x):
        x = self.max_pool(jnp.tanh(self.conv1(x)))
        x = self.avg_pool(jnp.tanh(self.conv2(x)))
        return self.out(x.reshape(-1))


class EqxBlock(eqx.Module):
    """Pre-norm transformer block on one sequence, with a tied embedding and a causal mask."""

    embed: eqx.nn.Embedding
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm

    def __init__(self, key):
        k = jax.random.split(key, 2)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=k[0])
        self.norm1 = eqx.nn.LayerNorm(WIDTH)
        self.attention = eqx.nn.MultiheadAttention(
            HEADS, WIDTH, use_query_bias=True, use_key_bias=True, use_value_bias=True,
            use_output_bias=True, key=k[1])
        self.norm2 = eqx.nn.LayerNorm(WIDTH)

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        h = jax.vmap(self.norm1)(x)
        causal = jnp.tril(jnp.ones((tokens.size, tokens.size), bool))
        x = x + self.attention(h, h, h, mask=causal)
        return jax.vmap(self.norm2)(x) @ self.embed.weight.T


def eqx_problem(module, data, head):
    """Build the `Problem` for the array leaves of `module`, vmapped over the batch."""
    params, static = eqx.partition(module, eqx.is_array)

    def loss(params, inputs, *targets):
        model = eqx.combine(params, static)
        return head(jax.vmap(model)(inputs), *targets)

    return Problem(loss, params, data)


def eqx_mlp():
    key = jax.random.key(0)
    return eqx_problem(EqxMLP(5, key), classification_data(1, (5,)), mean_cross_entropy)


def eqx_cnn():
    data = classification_data(2, (1, IMAGE, IMAGE))
    return eqx_problem(EqxCNN(jax.random.key(0)), data, mean_cross_entropy)


def eqx_block():
    tokens = token_data(3)
    return eqx_problem(EqxBlock(jax.random.key(0)), tokens,
                       lambda logits: next_token_loss(logits, *tokens))


# --- tests ---------------------------------------------------------------------------------

MODELS = [linen_mlp, linen_cnn, linen_block, nnx_mlp, nnx_cnn, nnx_block, eqx_mlp, eqx_cnn,
          eqx_block]


def _check_structure(estimator, problem):
    """Assert that the diagonal has the pytree structure, shapes and dtypes of the parameters."""
    # The structure is fixed when the estimator is traced, so tracing alone is enough. The
    # estimator's jit caches this trace, and the draws of `assert_unbiased` reuse it.
    diag = jax.eval_shape(lambda *args: estimator(*args, key=jax.random.key(0)),
                          problem.params, *problem.data)
    assert jax.tree_util.tree_structure(diag) == jax.tree_util.tree_structure(problem.params)
    shapes = jax.tree_util.tree_map(lambda d, p: d.shape == p.shape, diag, problem.params)
    assert all(jax.tree_util.tree_leaves(shapes)), shapes
    dtypes = jax.tree_util.tree_map(lambda d, p: d.dtype == p.dtype, diag, problem.params)
    assert all(jax.tree_util.tree_leaves(dtypes)), dtypes


def _check_unbiased(estimator, problem):
    args = (problem.params, *problem.data)
    exact = reference_diag(problem.loss, args)
    assert_unbiased(estimator, args, exact)


@pytest.mark.parametrize("build", MODELS, ids=lambda build: build.__name__)
def test_model_diag_structure_and_mean(build):
    """The diagonal is shaped like the parameters and averages to the exact one."""
    problem = build()
    estimator = cpjax.cp_hessian_diag(problem.loss)
    _check_structure(estimator, problem)
    _check_unbiased(estimator, problem)


def test_remat_diag_unbiased():
    """Layers wrapped in `nn.remat` (`jax.checkpoint`) keep the estimate unbiased."""
    problem = linen_remat_mlp()
    _check_unbiased(cpjax.cp_hessian_diag(problem.loss), problem)
