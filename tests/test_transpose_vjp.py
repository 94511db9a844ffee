"""The VJPs the sweep takes from JAX's transpose rules equal those of `jax.vjp`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cpjax import _sweep
from cpjax._trace import bind_node, trace_program

A = jnp.arange(1.0, 7.0).reshape(2, 3)
B = jnp.linspace(-1.0, 2.0, 6).reshape(2, 3)
C = jnp.linspace(0.5, 1.5, 12).reshape(3, 4)
PAD_VALUE = jnp.asarray(0.5, A.dtype)

# Each function is one equation of the primitive named: (function, arguments, indices of
# the arguments the sweep differentiates).
CASES = {
    "add": (lax.add, (A, B), [0, 1]),
    "add_one_dependent": (lax.add, (A, B), [1]),
    "sub": (lax.sub, (A, B), [0, 1]),
    "neg": (lax.neg, (A,), [0]),
    "broadcast_in_dim": (lambda a: lax.broadcast_in_dim(a, (2, 4, 3), (0, 2)), (A,), [0]),
    "reduce_sum": (lambda a: lax.reduce_sum(a, (1,)), (A,), [0]),
    "reshape": (lambda a: lax.reshape(a, (3, 2)), (A,), [0]),
    "transpose": (lambda a: lax.transpose(a, (1, 0)), (A,), [0]),
    "squeeze": (lambda a: lax.squeeze(a, (0,)), (A[:1],), [0]),
    "concatenate": (lambda a, b: lax.concatenate([a, b], 1), (A, B), [0, 1]),
    "pad": (lambda a, p: lax.pad(a, p, ((1, 0, 0), (0, 2, 1))), (A, PAD_VALUE), [0, 1]),
    "mul": (lax.mul, (A, B), [0, 1]),
    "dot_general": (lambda a, c: lax.dot(a, c), (A, C), [0, 1]),
    "div_numerator": (lax.div, (A, B + 2.0), [0]),
}


def _single_node(fun, args):
    program, _ = trace_program(fun, list(args), jax.tree_util.tree_structure(tuple(args)))
    assert len(program.nodes) == 1
    return program.nodes[0]


def _reference_vjp(node, args, dep_idx):
    """Return the node's output and `jax.vjp`'s VJP over the arguments in `dep_idx`."""

    def apply_node(*dep_vals):
        merged = list(args)
        for i, v in zip(dep_idx, dep_vals, strict=True):
            merged[i] = v
        return bind_node(node, merged)[0]

    return jax.vjp(apply_node, *[args[i] for i in dep_idx])


@pytest.mark.parametrize("name", sorted(CASES))
def test_transpose_vjp_matches_jax_vjp(name):
    fun, args, dep_idx = CASES[name]
    node = _single_node(fun, args)
    vjp_fn = _sweep._transpose_vjp(node, list(args), dep_idx)
    assert vjp_fn is not None, f"no transpose rule used for {node.primitive}"

    out, reference = _reference_vjp(node, args, dep_idx)
    cotangent = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    got, want = vjp_fn([cotangent]), reference(cotangent)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_transpose_vjp_under_vmap():
    """The sweep applies the VJP to the stacked T and U rows with `jax.vmap`."""
    node = _single_node(lambda a, c: lax.dot(a, c), (A, C))
    vjp_fn = _sweep._transpose_vjp(node, [A, C], [0, 1])
    rows = jnp.stack([jnp.ones((2, 4)), jnp.arange(8.0).reshape(2, 4)])
    got_a, got_c = jax.vmap(vjp_fn)([rows])
    for k in range(2):
        np.testing.assert_allclose(got_a[k], rows[k] @ C.T, rtol=1e-6)
        np.testing.assert_allclose(got_c[k], A.T @ rows[k], rtol=1e-6)


def test_nonlinear_equation_not_transposed():
    node = _single_node(lax.tanh, (A,))
    assert _sweep._transpose_vjp(node, [A], [0]) is None


def test_divisor_not_transposed():
    """A quotient is not linear in its divisor, so `jax.vjp` handles that case."""
    node = _single_node(lax.div, (A, B + 2.0))
    assert _sweep._transpose_vjp(node, [A, B + 2.0], [0, 1]) is None


ROW_SCALE = jnp.linspace(0.5, 1.5, 2).reshape(2, 1)

# Products and quotients with an operand broadcast along size-1 axes, or a scalar operand.
# The sweep forms their rows' VJP itself. Each entry: (function, arguments, indices of the
# arguments the sweep differentiates).
BROADCAST_CASES = {
    "mul_row_scale": (lax.mul, (A, ROW_SCALE), [0, 1]),
    "mul_broadcast_only": (lax.mul, (A, ROW_SCALE), [1]),
    "div_by_row": (lax.div, (A, ROW_SCALE + 1.0), [0, 1]),
    "div_of_row": (lax.div, (ROW_SCALE, A + 1.0), [0, 1]),
    "mul_scalar": (lax.mul, (A, jnp.asarray(1.5)), [0, 1]),
}


@pytest.mark.parametrize("name", sorted(BROADCAST_CASES))
def test_broadcast_operand_rows_match_vmapped_vjp(name):
    fun, args, dep_idx = BROADCAST_CASES[name]
    node = _single_node(fun, args)
    out = bind_node(node, list(args))
    rows = jnp.stack([jnp.cos(jnp.arange(6.0)).reshape(2, 3), jnp.arange(6.0).reshape(2, 3)])
    targets = list(range(len(dep_idx)))
    got = _sweep._broadcast_operand_rows(node, list(args), out, dep_idx, targets, [rows])
    assert got is not None, f"rows' VJP left to JAX for {name}"

    _, vjp_fn = _reference_vjp(node, args, dep_idx)
    want = jax.vmap(vjp_fn)(rows)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_equal_shapes_left_to_jax():
    node = _single_node(lax.mul, (A, B))
    rows = jnp.stack([A, B])
    assert _sweep._broadcast_operand_rows(node, [A, B], [A * B], [0, 1], [0, 1], [rows]) is None
