"""Property-based check: random compositions of primitives give unbiased estimates."""

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import cpjax
from tests.helpers import assert_unbiased, reference_diag

X = jnp.array([0.21, -0.47, 0.33, 0.78, -0.62, 0.15])
WEIGHTS = jnp.array([1.0, -0.7, 0.5, -1.3, 0.9, -0.4])
MIX = jnp.array([
    [0.5, 0.2, 0.1, 0.0, 0.1, 0.1],
    [0.1, 0.4, 0.2, 0.1, 0.0, 0.2],
    [0.0, 0.3, 0.3, 0.2, 0.2, 0.0],
    [0.2, 0.0, 0.1, 0.5, 0.1, 0.1],
    [0.1, 0.1, 0.0, 0.2, 0.4, 0.2],
    [0.3, 0.1, 0.1, 0.0, 0.2, 0.3],
])

# Unary maps defined on all of R that grow at most like a cubic of a bounded input.
UNARY = {
    "sin": jnp.sin,
    "tanh": jnp.tanh,
    "atan": jnp.arctan,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "exp": lambda u: jnp.exp(0.5 * u),
    "cosh": lambda u: jnp.cosh(0.5 * u),
    "square": lambda u: 0.5 * u**2,
    "cube": lambda u: 0.3 * u**3,
    "log1p_square": lambda u: jnp.log1p(u**2),
}

# Binary maps of the running vector u and a second operand, kept inside each domain.
BINARY = {
    "add": lambda u, v: u + v,
    "mul": lambda u, v: u * v,
    "div": lambda u, v: u / (1.5 + v**2),
    "pow": lambda u, v: (1 + u**2) ** (0.5 * jnp.tanh(v)),
    "atan2": lambda u, v: jnp.arctan2(u, 1 + v**2),
    "max": jnp.maximum,
}

# Second operands: the input itself (a second use of the leaf), a permutation, a dense mix
# and a prefix sum of the running vector.
OPERANDS = {
    "input": lambda u, x: x,
    "reversed": lambda u, x: u[::-1],
    "mixed": lambda u, x: MIX @ u,
    "cumsum": lambda u, x: 0.3 * jnp.cumsum(u),
}

unary_steps = st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)))
binary_steps = st.tuples(
    st.just("binary"), st.sampled_from(sorted(BINARY)), st.sampled_from(sorted(OPERANDS))
)
programs = st.tuples(
    st.lists(st.one_of(unary_steps, binary_steps), min_size=2, max_size=5),
    st.sampled_from(["sum", "weighted_sum"]),
)


def build_function(steps, reduction):
    def fun(x):
        u = x
        for step in steps:
            if step[0] == "unary":
                u = UNARY[step[1]](u)
            else:
                u = BINARY[step[1]](u, OPERANDS[step[2]](u, x))
        return jnp.sum(u) if reduction == "sum" else jnp.sum(WEIGHTS * u)

    return fun


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(programs)
def test_random_composition_unbiased(program):
    steps, reduction = program
    fun = build_function(steps, reduction)
    exact = reference_diag(fun, (X,))
    assert bool(jnp.all(jnp.isfinite(exact)))
    assert_unbiased(cpjax.cp_hessian_diag(fun), (X,), exact, n=1000, z=6.0)
