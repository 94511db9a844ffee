"""custom_jvp_call: functions with a custom JVP rule, such as `jax.nn.relu` or `softplus`.

`jax.hessian` differentiates the custom rule, not the function's body, so the body cannot
simply be inlined. The linear part of the equation comes from JAX's VJP of the whole call
(which follows the custom rule). For the local curvature:

* a body that is piecewise linear (relu, relu6, hard_tanh) injects nothing;
* a call with a rule of its own (`logaddexp`, behind `softplus` and `log_sigmoid`) uses it;
* anything else uses the generic rule, whose Hessian-vector products also go through the
  custom rule, with a warning.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.extend import core as jcore

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


@functools.lru_cache(maxsize=256)
def _rule_is_piecewise_linear(eqn) -> bool:
    """Return whether the body and the custom JVP rule are both piecewise linear in the primals.

    `jax.hessian` differentiates the rule, so a piecewise-linear body (`jnp.clip`) with a
    rule whose tangent map varies smoothly (`t * cos(x)`) still has curvature.
    """
    params = eqn.params
    n_in = len(eqn.invars) - params["num_consts"]
    if not _is_piecewise_linear(params["call_jaxpr"], len(eqn.invars)):
        return False
    try:
        jvp_jaxpr, consts, _ = params["jvp_jaxpr_fun"].call_wrapped(*([False] * n_in))
    except Exception:  # a rule we cannot trace on its own: assume it has curvature
        return False
    # Only the tangent outputs matter: the primal outputs call the function itself again.
    return _is_piecewise_linear(jcore.ClosedJaxpr(jvp_jaxpr, consts), n_in,
                                n_ignored_outputs=len(eqn.outvars))


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
        return self._delegate(node).curvature(node, info)

    def inject(self, ctx):
        return self._delegate(ctx.node).inject(ctx)


CUSTOM_JVP = CustomJvpRule()
