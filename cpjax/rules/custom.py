"""custom_jvp_call: functions with a custom JVP rule, such as `jax.nn.relu` or `softplus`.

`jax.hessian` differentiates the custom rule, not the function's body, so the body cannot
simply be inlined. The linear part of the equation comes from JAX's VJP of the whole call
(which follows the custom rule). For the local curvature:

* a body that is piecewise linear (relu, relu6, hard_tanh) injects nothing;
* a call with a rule of its own (`logaddexp`, behind `softplus` and `log_sigmoid`) uses it;
* anything else uses the generic rule, whose Hessian-vector products also go through the
  custom rule, with a warning.

Deviation from `jax.hessian` for inconsistent rules: the sweep carries T and U through the
rule's tangent map J, so it estimates `Jᵀ ∇²g J` for what follows the call. `jax.hessian`
differentiates the gradient `Jᵀ ∇g(y)`, in which `y` is the rule's primal output, and gets
`Jᵀ ∇²g J_y`, with `J_y` the derivative of however the rule computes `y`. The two agree when
the rule computes `y` by calling the function itself (JAX then differentiates `y` by the
rule, `J_y = J`) or when its tangents are the derivatives of `y`. A rule that computes `y`
with other operations is reported by a `CustomRuleWarning`, since the two differ where its
tangents are not the derivatives of `y` (a straight-through estimator, say).
"""

from __future__ import annotations

import functools
import os
import warnings

import jax.numpy as jnp
from jax.extend import core as jcore

from cpjax._trace import user_stacklevel
from cpjax.rules._base import Curvature, Rule
from cpjax.rules.binary import BinaryRule
from cpjax.rules.fallback import FALLBACK


def _logaddexp(a, b, y):
    s = jnp.exp(a - y) * jnp.exp(b - y)  # σ(a − b) σ(b − a)
    return s, -s, s


NAMED = {"logaddexp": BinaryRule(_logaddexp)}


def _is_piecewise_linear(closed_jaxpr, n_dependent, n_ignored_outputs=0) -> bool:
    """Return whether a jaxpr is piecewise linear in its first `n_dependent` inputs.

    The first `n_ignored_outputs` outputs are left out of the check.
    """
    from cpjax._sweep import make_plan
    from cpjax._trace import build_program

    program = build_program(closed_jaxpr)
    deps = [{0} if i < n_dependent else set() for i in range(len(program.invars))]
    signs = [0] * n_ignored_outputs + [None] * (len(program.outvars) - n_ignored_outputs)
    plan = make_plan(program, deps, signs, prune=False)
    return all(kind is Curvature.NONE for kind in plan.kinds.values())


class CustomRuleWarning(UserWarning):
    """A custom JVP rule computes its primal output by other operations than the function.

    CP then estimates the Hessian that `jax.hessian` would give if the rule called the
    function itself, which differs from `jax.hessian`'s result where the rule's tangents are
    not the derivatives of its primal output (see `cpjax.rules.custom`).
    """


@functools.lru_cache(maxsize=256)
def _rule_jaxpr(eqn):
    """Return the custom JVP rule of `eqn` as a `ClosedJaxpr`, or None if it cannot be traced.

    Its outputs are the primal outputs, then the tangents. Its inputs are the primals, then
    the tangents (non-zero for every input).
    """
    n_in = len(eqn.invars) - eqn.params["num_consts"]
    try:
        jvp_jaxpr, consts, _ = eqn.params["jvp_jaxpr_fun"].call_wrapped(*([False] * n_in))
    except Exception:  # a rule that does not trace on its own
        return None
    return jcore.ClosedJaxpr(jvp_jaxpr, consts)


@functools.lru_cache(maxsize=256)
def _rule_is_piecewise_linear(eqn) -> bool:
    """Return whether the body and the custom JVP rule are both piecewise linear in the primals.

    `jax.hessian` differentiates the rule, so a piecewise-linear body (`jnp.clip`) with a
    rule whose tangent map varies smoothly (`t * cos(x)`) still has curvature.
    """
    n_in = len(eqn.invars) - eqn.params["num_consts"]
    if not _is_piecewise_linear(eqn.params["call_jaxpr"], len(eqn.invars)):
        return False
    rule = _rule_jaxpr(eqn)
    if rule is None:
        # Inside a shard_map a rule does not trace on its own: JAX checks the mesh axes its
        # output varies over. A rule defined inside JAX (`jax.nn.relu`) gives the derivative
        # of the function's body, constant where the body is linear. Others may have
        # curvature.
        return _defined_in_jax(eqn)
    # Only the tangent outputs matter here. `_check_primal_output` checks the primal ones.
    return _is_piecewise_linear(rule, n_in, n_ignored_outputs=len(eqn.outvars))


@functools.lru_cache(maxsize=256)
def _rule_calls_function(eqn) -> bool:
    """Return whether the rule computes its primal outputs by calling the function itself.

    Rules defined with `defjvps` (`jax.nn.relu`, `logaddexp`) do, and so do rules that
    return `f(x)` or `jax.jit(f)(x)`. JAX then differentiates the primal output by the rule
    again. Functions defined inside JAX are trusted: `jnp.linalg.det` computes its primal
    output by an LU factorization, and its tangents are the derivatives of that output.
    """
    if _defined_in_jax(eqn):
        return True
    rule = _rule_jaxpr(eqn)
    if rule is None:
        return True  # nothing to say about a rule we cannot read
    body = str(eqn.params["call_jaxpr"])
    return _only_calls(rule.jaxpr, rule.jaxpr.outvars[:len(eqn.outvars)], body)


def _defined_in_jax(eqn) -> bool:
    debug = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
    source = getattr(debug, "func_src_info", None) or ""
    return f"{os.sep}jax{os.sep}_src{os.sep}" in source


def _only_calls(jaxpr, outvars, body: str) -> bool:
    """Return whether only calls of one custom function compute `outvars`.

    The function is the one whose body prints as `body`. The calls may sit inside jit calls.
    """
    for e in _eqns_computing(jaxpr, outvars):
        if e.primitive.name == "custom_jvp_call":
            if str(e.params["call_jaxpr"]) != body:
                return False
        elif e.primitive.name == "jit":
            inner = e.params["jaxpr"]
            if not _only_calls(inner.jaxpr, inner.jaxpr.outvars, body):
                return False
        else:
            return False
    return True


def _eqns_computing(jaxpr, outvars) -> list:
    """Return the equations of `jaxpr` that `outvars` depend on."""
    needed = {v for v in outvars if isinstance(v, jcore.Var)}
    found = []
    for e in reversed(jaxpr.eqns):
        if any(v in needed for v in e.outvars):
            found.append(e)
            needed.update(v for v in e.invars if isinstance(v, jcore.Var))
    return found


def _check_primal_output(node) -> None:
    """Warn when the rule of `node` computes its primal output by other operations."""
    if _rule_calls_function(node.eqn):
        return
    name = custom_function_name(node) or "a custom_jvp function"
    warnings.warn(
        f"The custom JVP rule of {name} (at {node.where()}) computes its primal output by "
        "other operations than the function itself. CP follows the rule's tangents, but "
        "jax.hessian also differentiates those operations, and the two differ where the "
        "tangents are not their derivatives (a straight-through estimator, say). Return "
        "the function's own output from the rule (`return f(x), tangent`) to make them "
        "agree.",
        CustomRuleWarning,
        stacklevel=user_stacklevel(),
    )


def custom_function_name(node) -> str | None:
    """Return the Python name of the function a custom_jvp_call wraps, if JAX recorded it."""
    debug = getattr(node.params["call_jaxpr"].jaxpr, "debug_info", None)
    source = getattr(debug, "func_src_info", None) or ""
    return source.split(" ")[0] or None


class CustomJvpRule(Rule):
    def _delegate(self, node):
        if _rule_is_piecewise_linear(node.eqn):
            return Rule()
        return NAMED.get(custom_function_name(node), FALLBACK)

    def curvature(self, node, info):
        if any(info.deps):
            _check_primal_output(node)
        return self._delegate(node).curvature(node, info)

    def inject(self, ctx):
        return self._delegate(ctx.node).inject(ctx)


CUSTOM_JVP = CustomJvpRule()
