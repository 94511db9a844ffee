"""Unbiasedness of `cp_hessian_diag` on small functions that cover every curvature rule.

Every entry is checked against the diagonal of the float64 `jax.hessian` with
`assert_unbiased` (2000 single-probe estimates, z = 6, fixed seed). Most functions have six
to ten coordinates (one has 22), with inputs kept inside each primitive's domain and away
from the kinks of piecewise-linear maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy import special

import cpjax
from tests.helpers import assert_unbiased, reference_diag

# Distinct values in (0, 1), so sort, max and min have no ties.
X = jnp.array([0.21, 0.47, 0.33, 0.78, 0.62, 0.15])
# Mixed-sign output weights: the cotangent of the weighted term has no static sign.
W = jnp.array([1.0, -0.7, 0.5, -1.3, 0.9, -0.4])


def _mixing_matrix():
    rng = np.random.default_rng(7)
    matrix = rng.uniform(0.2, 1.0, (6, 6))
    return jnp.asarray(matrix / matrix.sum(axis=1, keepdims=True))


# Row-stochastic with positive entries: MIX @ x stays in (min x, max x) and mixes every
# coordinate into every output, so the estimates have a nonzero variance.
MIX = _mixing_matrix()


def mix(x):
    return MIX @ x


@dataclasses.dataclass(frozen=True)
class Case:
    fun: Callable
    args: tuple = (X,)
    argnums: int | tuple = 0
    fallback: bool = False  # the function uses a primitive without a curvature rule


def case(case_id, fun, args=(X,), argnums=0, fallback=False):
    return pytest.param(Case(fun, args, argnums, fallback), id=case_id)


# --- zero local curvature: linear and piecewise-linear primitives -----------------------


def gather(x):
    return jnp.sum(W[:5] * jnp.sin(3 * mix(x)[jnp.array([0, 2, 2, 5, 1])]) ** 3)


def scatter_add(x):
    y = jnp.zeros(4).at[jnp.array([0, 1, 1, 3, 0])].add(jnp.exp(mix(x)[:5]))
    return jnp.sum(W[:4] * jnp.tanh(y))


def scatter_add_both_dependent(x):
    y = x.at[jnp.array([0, 2, 2])].add(mix(x)[3:] ** 2)
    return jnp.sum(W * jnp.sin(2 * y))


def dynamic_slice(x):
    y = lax.dynamic_slice(jnp.sin(3 * mix(x)), (2,), (3,))
    return jnp.sum(W[:3] * y**3)


def dynamic_update_slice(x):
    y = lax.dynamic_update_slice(jnp.exp(mix(x)), jnp.sin(x[:2]) ** 2, (3,))
    return jnp.sum(W * jnp.tanh(y))


def pad_dependent_value(x):
    # Interior padding 1 and edges (1, 2): 1 + 6 + 5 + 2 = 14 entries, the padding value
    # itself a function of x.
    y = lax.pad(jnp.sin(2 * mix(x)), x[0] ** 2, [(1, 2, 1)])
    return jnp.sum(jnp.linspace(-1.0, 1.0, 14) * jnp.tanh(3 * y))


def concatenate(x):
    y = jnp.concatenate([jnp.sin(mix(x)), x[:3] ** 2])
    return jnp.sum(jnp.linspace(-1.0, 1.0, 9) * jnp.exp(y))


def cumsum(x):
    return jnp.sum(W * jnp.cos(jnp.cumsum(mix(x))))


def sort(x):
    return jnp.sum(W * jnp.sort(jnp.sin(3 * x) + mix(x)) ** 3)


def reduce_max_min(x):
    u = jnp.sin(3 * mix(x))
    return jnp.max(u) ** 3 - jnp.exp(jnp.min(u * x))


def select_n(x):
    u = mix(x)
    return jnp.sum(W * jnp.where(x > 0.4, jnp.exp(u), u**3))


def clamp(x):
    # Three of the six entries lie inside [0.9, 2.1], and the other three are clamped to 2.1.
    return jnp.sum(W * lax.clamp(0.9, 3 * jnp.sin(mix(x) + x), 2.1) ** 3)


def abs_value(x):
    return jnp.sum(W * jnp.abs(mix(x) - x) ** 3)


def max_min_binary(x):
    u = mix(x)
    return jnp.sum(W * jnp.exp(jnp.maximum(x, u[::-1])) + jnp.minimum(u, 0.45) ** 3)


ZERO_CURVATURE = [
    case("gather", gather),
    case("scatter_add", scatter_add),
    case("scatter_add_both_dependent", scatter_add_both_dependent),
    case("dynamic_slice", dynamic_slice),
    case("dynamic_update_slice", dynamic_update_slice),
    case("pad_dependent_value", pad_dependent_value),
    case("concatenate", concatenate),
    case("cumsum", cumsum),
    case("sort", sort),
    case("reduce_max_min", reduce_max_min),
    case("select_n_where", select_n),
    case("clamp", clamp),
    case("abs", abs_value),
    case("max_min", max_min_binary),
]


# --- elementwise unary primitives --------------------------------------------------------


def unary(op, shift=0.0, scale=1.0):
    """Return `x -> Σ W ⊙ op(shift + scale · MIX x)`, where MIX x lies in [0.15, 0.78]."""

    def fun(x):
        return jnp.sum(W * op(shift + scale * mix(x)))

    return fun


UNARY = [
    case("exp", unary(jnp.exp, -0.5, 2.0)),
    case("exp2", unary(jnp.exp2, -0.5, 2.0)),
    case("log", unary(jnp.log)),
    case("log1p", unary(jnp.log1p, -0.5)),
    case("expm1", unary(jnp.expm1, -0.5, 2.0)),
    case("tanh", unary(jnp.tanh, -1.0, 3.0)),
    case("logistic", unary(jax.nn.sigmoid, -1.0, 3.0)),
    case("sin", unary(jnp.sin, -1.0, 3.0)),
    case("cos", unary(jnp.cos, -1.0, 3.0)),
    case("tan", unary(jnp.tan, -0.5, 2.0)),
    case("asin", unary(jnp.arcsin, -0.5, 1.5)),
    case("acos", unary(jnp.arccos, -0.5, 1.5)),
    case("atan", unary(jnp.arctan, -1.0, 3.0)),
    case("sinh", unary(jnp.sinh, -1.0, 3.0)),
    case("cosh", unary(jnp.cosh, -1.0, 3.0)),
    case("asinh", unary(jnp.arcsinh, -1.0, 3.0)),
    case("acosh", unary(jnp.arccosh, 1.0, 2.0)),
    case("atanh", unary(jnp.arctanh, -0.5, 1.5)),
    case("sqrt", unary(jnp.sqrt)),
    case("rsqrt", unary(lax.rsqrt)),
    case("cbrt", unary(jnp.cbrt, 0.1, 2.0)),
    case("square", unary(jnp.square, -0.5, 2.0)),
    case("integer_pow", unary(lambda u: u**3, -0.5, 2.0)),
    case("erf", unary(special.erf, -1.0, 3.0)),
    case("erfc", unary(special.erfc, -1.0, 3.0)),
    case("erf_inv", unary(special.erfinv, -0.5, 1.5)),
    case("lgamma", unary(special.gammaln, 0.2, 2.0)),
    case("digamma", unary(special.digamma, 0.2, 2.0)),
]


def psd_sum(op, sign=1.0, shift=0.0, scale=1.0):
    """Return `x -> sign · Σ op(shift + scale · MIX x)`, a PSD injection for each op below."""

    def fun(x):
        return sign * jnp.sum(op(shift + scale * mix(x)))

    return fun


# The output cotangent and φ'' have one sign everywhere, so every injection is positive
# semi-definite and the sweep carries a single vector (T = U).
SYMMETRIC = [
    case("exp_symmetric", psd_sum(jnp.exp)),
    case("rsqrt_symmetric", psd_sum(lax.rsqrt)),
    case("square_symmetric", psd_sum(jnp.square, shift=-0.5, scale=2.0)),
    case("even_power_symmetric", psd_sum(lambda u: u**4, shift=-0.5, scale=2.0)),
    case("neg_log_symmetric", psd_sum(jnp.log, sign=-1.0)),
    case("neg_acosh_symmetric", psd_sum(jnp.arccosh, sign=-1.0, shift=1.0, scale=2.0)),
]


# --- elementwise binary primitives -------------------------------------------------------

A = jnp.array([0.3, 0.55, 0.8])
B = jnp.array([0.45, 0.2, 0.7])


def mul_same_leaf(x):
    return jnp.sum(W * jnp.sin(2 * x) * jnp.exp(mix(x)[::-1]))


def mul_self(x):
    u = mix(x) - 0.4
    return jnp.sum(W * u * u)


def div_same_leaf(x):
    return jnp.sum(W * jnp.sin(2 * x) / (0.5 + jnp.cos(mix(x)[::-1])))


def pow_same_leaf(x):
    return jnp.sum(W * (0.5 + x) ** (2 * mix(x)[::-1] - 0.5))


def atan2_same_leaf(x):
    return jnp.sum(W * jnp.arctan2(jnp.sin(3 * x) - 0.5, 0.3 + mix(x)[::-1]))


def mul_disjoint(a, b):
    return jnp.sum(W[:3] * jnp.sin(2 * a) * jnp.exp(b[::-1]))


def div_disjoint(a, b):
    return jnp.sum(W[:3] * jnp.sin(2 * a) / (0.5 + b**2))


def pow_disjoint(a, b):
    return jnp.sum(W[:3] * (0.5 + a) ** (2 * b - 0.5))


def atan2_disjoint(a, b):
    return jnp.sum(W[:3] * jnp.arctan2(jnp.sin(3 * a) - 0.5, 0.3 + b))


def div_row_broadcast(x):
    """A layer norm: each row divided by its own standard deviation, broadcast along it."""
    rows = mix(x).reshape(2, 3)
    centred = rows - rows.mean(axis=1, keepdims=True)
    scale = jnp.sqrt((centred**2).mean(axis=1, keepdims=True) + 0.01)
    return jnp.sum(W.reshape(2, 3) * jnp.tanh(2 * centred / scale))


def div_by_row_sum(x):
    """Only the division is curved: rows over a linear function of themselves."""
    rows = mix(x).reshape(2, 3)
    return jnp.sum(W.reshape(2, 3) * rows / (0.2 + rows.sum(axis=1, keepdims=True)))


def mul_by_scalar_mean(x):
    """Only the product is curved: a vector times the scalar mean of another one."""
    return jnp.sum(W * mix(x) * jnp.mean(x[::-1] * W))


def pow_pytree(params):
    u = (0.5 + params["base"]) ** (2 * params["exponent"] - 0.5)
    return jnp.sum(W[:3] * u) + jnp.sum(params["base"] * params["exponent"][::-1] ** 2)


def outer_same_leaf(x):
    weights = jnp.outer(W, W[::-1])
    return jnp.sum(weights * jnp.tanh(2 * jnp.outer(x, mix(x)) - 0.3))


def outer_disjoint(a, b):
    weights = jnp.outer(W[:3], W[3:])
    return jnp.sum(weights * jnp.tanh(2 * jnp.outer(a, jnp.sin(b)) - 0.3))


BINARY = [
    case("mul_same_leaf", mul_same_leaf),
    case("mul_self", mul_self),
    case("div_same_leaf", div_same_leaf),
    case("pow_same_leaf", pow_same_leaf),
    case("atan2_same_leaf", atan2_same_leaf),
    case("mul_disjoint", mul_disjoint, (A, B), (0, 1)),
    case("div_disjoint", div_disjoint, (A, B), (0, 1)),
    case("pow_disjoint", pow_disjoint, (A, B), (0, 1)),
    case("atan2_disjoint", atan2_disjoint, (A, B), (0, 1)),
    case("pow_pytree", pow_pytree, ({"base": A, "exponent": B},)),
    case("div_row_broadcast", div_row_broadcast),
    case("div_by_row_sum", div_by_row_sum),
    case("mul_by_scalar_mean", mul_by_scalar_mean),
    case("outer_same_leaf", outer_same_leaf),
    case("outer_disjoint", outer_disjoint, (A, B), (0, 1)),
]


# --- bilinear primitives -----------------------------------------------------------------


def matmul_self(x):
    m = x.reshape(2, 3)
    return jnp.sum(jnp.array([[1.0, -0.5], [0.7, -1.2]]) * jnp.tanh(2 * m @ m.T - 0.5))


def matmul_disjoint(a, b):
    return jnp.sum(W[:4].reshape(2, 2) * jnp.tanh(a.reshape(2, 3) @ b.reshape(3, 2)))


def conv_self(x):
    image = x.reshape(1, 1, 8)  # batch, channel, width
    kernel = jnp.sin(2 * x[:3]).reshape(1, 1, 3)  # out channel, in channel, width
    out = lax.conv_general_dilated(image, kernel, window_strides=(1,), padding="VALID")
    return jnp.sum(W.reshape(1, 1, 6) * jnp.tanh(3 * out - 1))


X8 = jnp.array([0.21, 0.47, 0.33, 0.78, 0.62, 0.15, 0.9, 0.4])

BILINEAR = [
    case("matmul_self", matmul_self),
    case("matmul_disjoint", matmul_disjoint, (X, jnp.linspace(-0.8, 0.9, 6)), (0, 1)),
    case("conv_self", conv_self, (X8,)),
]


# --- composite, custom_jvp and control flow ----------------------------------------------

LABELS = jnp.array([2, 0])


def cross_entropy(x):
    logits = 3 * mix(x).reshape(2, 3)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, LABELS[:, None], axis=1))


def log_softmax_weighted(x):
    logits = 3 * (mix(x) + x).reshape(2, 3)
    return jnp.sum(W.reshape(2, 3) * jax.nn.log_softmax(logits, axis=-1))


def softplus(x):
    return jnp.sum(W * jax.nn.softplus(4 * mix(x) - 2))


def relu(x):
    return jnp.sum(W * jax.nn.relu(mix(x) - 0.4) ** 3 + jnp.exp(jax.nn.relu(x - 0.3)))


def diagonal_cond(x):
    # jnp.diagonal of a square matrix emits a cond on the platform index.
    return jnp.sum(W * jnp.exp(jnp.diagonal(jnp.outer(x, mix(x)))))


def data_cond(x):
    def exp_branch(x):
        return jnp.sum(W * jnp.exp(mix(x)) * x)

    def log_branch(x):
        return jnp.sum(W * jnp.log1p(mix(x) ** 2))

    return lax.cond(jnp.sum(x) > 3.0, exp_branch, log_branch, x)


def reduce_prod(x):
    return jnp.prod(0.5 + mix(x)) + jnp.sum(jnp.sin(x))


def cumprod(x):
    return jnp.sum(W * lax.cumprod(0.5 + mix(x)))


@jax.jit
def _three_factors(a, b, c):
    return a * jnp.sin(b) * jnp.exp(c)


def three_input_call(x):
    # A jit call of three dependent inputs goes to the fallback rule, which draws with
    # salts 0, 1 and 2. The sweep tables the seeds of salts 0 and 1 only.
    return jnp.sum(W * _three_factors(mix(x), x ** 2, jnp.cos(x)))


COMPOSITE = [
    case("log_softmax_cross_entropy", cross_entropy),
    case("log_softmax_weighted", log_softmax_weighted),
    case("softplus", softplus),
    case("relu", relu),
    case("diagonal_cond", diagonal_cond),
    case("cond_true_branch", data_cond, (2 * X,)),
    case("cond_false_branch", data_cond, (X,)),
    case("fallback_reduce_prod", reduce_prod, fallback=True),
    case("fallback_cumprod", cumprod, fallback=True),
    case("fallback_three_input_call", three_input_call, fallback=True),
]

# --- parameters contracted over a batch axis (the separable-axis form) -------------------

BATCH = jnp.array([[0.5, -0.2, 0.9], [-0.7, 0.3, 0.1], [0.2, 0.8, -0.4], [-0.1, -0.6, 0.6]])
DENSE = {
    "weights": jnp.array([[0.4, -0.3], [0.2, 0.7], [-0.5, 0.1]]),
    "bias": jnp.array([0.1, -0.2]),
    "scale": jnp.array([1.2, 0.8]),
}
OUT = jnp.array([[1.0, -0.5], [0.3, 0.9], [-1.1, 0.4], [0.6, -0.8]])


def dense_layer(params, x):
    h = jnp.tanh(x @ params["weights"] + params["bias"])
    return jnp.sum(OUT * jnp.sin(params["scale"] * h))


def dense_batch_statistics(params, x):
    # Centering over the batch couples the examples, so the batch axis is not separable.
    h = x @ params["weights"] + params["bias"]
    h = h - jnp.mean(h, axis=0)
    return jnp.sum(OUT * jnp.tanh(params["scale"] * h))


def dense_softmax_over_batch(params, x):
    logits = params["scale"] * (x @ params["weights"]) + params["bias"]
    return -jnp.sum(OUT * jax.nn.log_softmax(logits, axis=0))


def dense_example_similarity(params, x):
    h = jnp.tanh(x @ params["weights"] + params["bias"])
    return jnp.sum(jnp.tanh(h @ h.T)) + jnp.sum(params["scale"] ** 3)


BATCHED = [
    case("dense_layer", dense_layer, (DENSE, BATCH)),
    case("dense_batch_statistics", dense_batch_statistics, (DENSE, BATCH)),
    case("dense_softmax_over_batch", dense_softmax_over_batch, (DENSE, BATCH)),
    case("dense_example_similarity", dense_example_similarity, (DENSE, BATCH)),
    case("dense_weights_and_inputs", dense_layer, (DENSE, BATCH), (0, 1)),
]

BATTERY = ZERO_CURVATURE + UNARY + SYMMETRIC + BINARY + BILINEAR + COMPOSITE + BATCHED

# One or two entries per rule family, rerun with separable=False and with Gaussian probes.
SUBSET_IDS = {
    "scatter_add_both_dependent", "tanh", "exp_symmetric", "mul_same_leaf", "pow_disjoint",
    "matmul_self", "matmul_disjoint", "conv_self", "log_softmax_cross_entropy", "softplus",
    "cond_true_branch", "fallback_reduce_prod", "dense_layer", "dense_weights_and_inputs",
}
SUBSET = [p for p in BATTERY if p.id in SUBSET_IDS]


_REFERENCES = {}  # id(Case) -> exact diagonal, shared by the three runs of an entry


def cached_reference(entry: Case):
    if id(entry) not in _REFERENCES:
        _REFERENCES[id(entry)] = reference_diag(entry.fun, entry.args, entry.argnums)
    return _REFERENCES[id(entry)]


def check_case(entry: Case, **options):
    exact = cached_reference(entry)
    estimator = cpjax.cp_hessian_diag(entry.fun, entry.argnums, num_samples=1, **options)
    if entry.fallback:
        with pytest.warns(cpjax.FallbackWarning, match="no curvature rule for primitive"):
            assert_unbiased(estimator, entry.args, exact)
    else:
        assert_unbiased(estimator, entry.args, exact)


def test_battery_size():
    ids = [p.id for p in BATTERY]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)
    assert {p.id for p in SUBSET} == SUBSET_IDS


@pytest.mark.parametrize("entry", BATTERY)
def test_unbiased_default(entry):
    check_case(entry)


@pytest.mark.parametrize("entry", SUBSET)
def test_unbiased_not_separable(entry):
    check_case(entry, separable=False)


@pytest.mark.parametrize("entry", SUBSET)
def test_unbiased_gaussian_probes(entry):
    check_case(entry, probe="gaussian")


@pytest.mark.parametrize("entry", ZERO_CURVATURE)
def test_piecewise_linear_reference_nonzero(entry):
    """Each piecewise-linear entry still has curvature to estimate."""
    exact = cached_reference(entry)
    assert jnp.max(jnp.abs(exact)) > 1e-3
