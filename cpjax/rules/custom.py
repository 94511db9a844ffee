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

from cpjax.rules._base import Curvature, Rule
from cpjax.rules.binary import BinaryRule
from cpjax.rules.fallback import FALLBACK


def _logaddexp(a, b, y):
    s = jnp.exp(a - y) * jnp.exp(b - y)  # σ(a − b) σ(b − a)
    return s, -s, s


NAMED = {"logaddexp": BinaryRule(_logaddexp)}


@functools.lru_cache(maxsize=256)
def _body_is_piecewise_linear(call_jaxpr) -> bool:
    from cpjax._sweep import make_plan
    from cpjax._trace import build_program

    program = build_program(call_jaxpr)
    plan = make_plan(
        program, [{0}] * len(program.invars), [None] * len(program.outvars), prune=False
    )
    return all(kind is Curvature.NONE for kind in plan.kinds.values())


def custom_function_name(node) -> str | None:
    """Return the Python name of the function a custom_jvp_call wraps, if JAX recorded it."""
    debug = getattr(node.params["call_jaxpr"].jaxpr, "debug_info", None)
    source = getattr(debug, "func_src_info", None) or ""
    return source.split(" ")[0] or None


class CustomJvpRule(Rule):
    def _delegate(self, node):
        if _body_is_piecewise_linear(node.params["call_jaxpr"]):
            return Rule()
        return NAMED.get(custom_function_name(node), FALLBACK)

    def curvature(self, node, info):
        return self._delegate(node).curvature(node, info)

    def inject(self, ctx):
        return self._delegate(ctx.node).inject(ctx)


CUSTOM_JVP = CustomJvpRule()
