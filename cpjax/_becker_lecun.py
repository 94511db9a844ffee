"""Becker and LeCun's deterministic approximation of the Hessian diagonal.

Becker & LeCun ("Improving the convergence of back-propagation learning with second order
methods", 1988) back-propagate only the diagonal `D` of the Hessian with respect to each
variable, dropping every off-diagonal term. Through an equation with Jacobian `J` and local
curvature `M`:

    D_x = (J ∘ J)ᵀ D_y + diag(M)

This is exact when no variable feeds two outputs that interact downstream, and biased
otherwise (a softmax couples its outputs). It costs one extra linear backward pass. It runs
on the same flat program and analyses as Curvature Propagation, so it covers the same
programs. An equation it has no rule for raises an error that names the primitive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cpjax import _axes
from cpjax._errors import CurvatureError
from cpjax._trace import Var, bind_node
from cpjax.rules import RULES, Rule, rule_for
from cpjax.rules.binary import BinaryRule, sum_to_shape
from cpjax.rules.composite import _log_softmax_axes, row_blocks, softmax_centre, summed_axes
from cpjax.rules.elementwise import ElementwiseRule

_BILINEAR = (lax.dot_general_p, lax.conv_general_dilated_p)


def _partial(node, vals, i):
    """`∂y/∂x_i` elementwise, by a JVP with a tangent of ones on input `i`."""
    def f(x):
        v = list(vals)
        v[i] = x
        return bind_node(node, v)[0]

    x = vals[i]
    return jax.jvp(f, (x,), (jnp.ones_like(x),))[1]


def _local_second(node, vals, outs, i):
    """`φ_ii` for an elementwise node, or None when it is zero."""
    rule = RULES.get(node.primitive)
    if isinstance(rule, ElementwiseRule):
        return rule.second_derivative(vals[0], outs[0], node.params)
    if isinstance(rule, BinaryRule):
        return rule.partials(vals[0], vals[1], outs[0])[0 if i == 0 else 2]
    if type(rule_for(node)) is Rule:  # zero curvature
        return None
    unary = [jnp.asarray(v) for v in vals]

    def phi(x):
        v = list(unary)
        v[i] = x
        return bind_node(node, v)[0]

    x = vals[i]
    return jax.jvp(lambda z: jax.jvp(phi, (z,), (jnp.ones_like(z),))[1], (x,),
                   (jnp.ones_like(x),))[1]


def _elementwise(node, vals, outs, ybar, d_out, dep_idx):
    result = []
    for i in dep_idx:
        d = _partial(node, vals, i)
        diag = 0 if d_out is None else d * d * d_out
        second = _local_second(node, vals, outs, i) if ybar is not None else None
        if second is not None:
            diag = diag + ybar * second
        aval = node.invars[i].aval
        if isinstance(diag, int):
            result.append(None)
        else:  # in the input's dtype: a convert_element_type changes it
            result.append(sum_to_shape(diag, aval.shape).astype(aval.dtype))
    return result


def _bilinear(node, vals, d_out, dep_idx):
    if d_out is None:
        return [None] * len(dep_idx)
    result = []
    for i in dep_idx:
        squared = [v * v for v in vals]

        def product(x, i=i, squared=squared):
            operands = list(squared)
            operands[i] = x
            return bind_node(node, operands)[0]

        result.append(jax.vjp(product, vals[i])[1](d_out)[0])
    return result


def _log_softmax(node, vals, outs, ybar, d_out):
    axes = _log_softmax_axes(node.eqn)
    p = jnp.exp(outs[0])
    diag = -jnp.sum(ybar, axis=axes, keepdims=True) * (p - p * p)
    if d_out is not None:
        # J = I − 1 pᵀ per row: (J ∘ J)ᵀ D = D (1 − 2p) + p² Σ D.
        diag = diag + d_out * (1 - 2 * p) + p * p * jnp.sum(d_out, axis=axes, keepdims=True)
    return [diag]


def _softmax(node, p, ybar, d_out):
    """Return the gradient and `D` of a softmax kept whole, whose rule keeps `p` as residual.

    Per row `J = diag(p) − p pᵀ`, and the curvature `diag(c) − c pᵀ − p cᵀ` (see the
    softmax rule) has the diagonal `c (1 − 2p)`, with `c` the gradient.
    """
    axes = summed_axes(node.eqn)
    grad = softmax_centre(p, p * ybar, axes)
    diag = grad * (1 - 2 * p)
    if d_out is not None:
        # (J ∘ J)ᵀ D = p² (D (1 − 2p) + Σ p² D)
        diag = diag + p * p * (d_out * (1 - 2 * p)
                               + jnp.sum(p * p * d_out, axis=axes, keepdims=True))
    return grad, diag


def _rowwise(node, vals, ybar, d_out):
    """Return `diag(Jᵀ diag(D) J) + diag(M)` per row of a row-wise call, from exact blocks."""
    jacobian, hessian = row_blocks(node, vals[0], ybar)
    diag = jnp.diagonal(hessian, axis1=-2, axis2=-1)
    if d_out is not None:
        diag = diag + jnp.einsum("...ij,...i->...j", jacobian * jacobian, d_out)
    return diag


def _structural(node, vjp_fn, d_out, n_out):
    """Linear maps with coefficients 0 or 1: `(J ∘ J)ᵀ = Jᵀ`."""
    if d_out is None:
        return None
    return vjp_fn([d_out] + [jnp.zeros_like(d_out)] * (n_out - 1))


def backward_diagonal(node, vals, outs, ybar, d_out, vjp_fn, dep_idx, n_float_out):
    """Return `D` for each dependent input of `node` (None where it is zero)."""
    p = node.primitive
    if node.composite == "log_softmax":
        return _log_softmax(node, vals, outs, ybar, d_out)
    if node.composite == "rowwise":
        return [_rowwise(node, vals, ybar, d_out)]
    if p in _BILINEAR:
        return _bilinear(node, vals, d_out, dep_idx)
    elif _axes.is_elementwise(node) or (
        p.name == "custom_jvp_call" and _axes._custom_is_elementwise(node)
    ):
        return _elementwise(node, vals, outs, ybar, d_out, dep_idx)
    elif type(rule_for(node)) is Rule and len(outs) == 1:
        return _structural(node, vjp_fn, d_out, n_float_out)
    raise CurvatureError(
        f"becker_lecun_hessian_diag has no rule for primitive '{p.name}' at {node.where()}. "
        "Use cp_hessian_diag, which handles it, or exact_hessian_diag for small problems."
    )


def sweep_diagonal(plan, invals, out_cotangents, forward):
    """Run the backward pass of Becker and LeCun; return (grads, D) at the program inputs."""
    env, linear = forward
    grads, diags = {}, {}

    def add(store, var, value):
        if isinstance(var, Var) and value is not None:
            store[var] = value if var not in store else store[var] + value

    for v, ct in zip(plan.program.outvars, out_cotangents, strict=True):
        if ct is not None and v in plan.deps:
            add(grads, v, ct)
    for node in reversed(plan.program.nodes):
        if node.index not in linear:
            continue
        vals, outs, vjp_fn, dep_idx, float_out = linear[node.index]
        float_vars = [v for v, fl in zip(node.outvars, float_out, strict=True) if fl]
        ybar = [grads.pop(v, None) for v in float_vars]
        d_out = [diags.pop(v, None) for v in float_vars]
        if all(y is None for y in ybar):
            continue
        ybar_full = [jnp.zeros_like(env[v]) if y is None else y
                     for v, y in zip(float_vars, ybar, strict=True)]
        if node.composite == "softmax":  # `vjp_fn` is the rule's residual `p`
            grad, diag = _softmax(node, vjp_fn, ybar_full[0], d_out[0])
            add(grads, node.invars[0], grad)
            add(diags, node.invars[0], diag)
            continue
        if not callable(vjp_fn):  # a loop, whose rule runs its own backward pass
            raise CurvatureError(
                f"becker_lecun_hessian_diag has no rule for primitive '{node.primitive.name}' "
                f"at {node.where()}. Use cp_hessian_diag, which handles it."
            )
        for k, g in enumerate(vjp_fn(ybar_full)):
            add(grads, node.invars[dep_idx[k]], g)
        if len(float_vars) != 1:
            raise CurvatureError(
                f"becker_lecun_hessian_diag has no rule for primitive '{node.primitive.name}' "
                f"with several outputs, at {node.where()}."
            )
        in_diags = backward_diagonal(node, vals, outs, ybar[0], d_out[0], vjp_fn, dep_idx,
                                     len(float_vars))
        for k, d in enumerate(in_diags or []):
            add(diags, node.invars[dep_idx[k]], d)
    return ([grads.get(v) for v in plan.program.invars],
            [diags.get(v) for v in plan.program.invars])
