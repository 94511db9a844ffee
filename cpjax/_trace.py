"""Tracing a function to a flat program of equations that the sweep walks.

`jax.make_jaxpr` gives a closed jaxpr whose equations may hold nested jaxprs (jit, remat,
closed_call). The sweep wants one flat list, so calls whose body is an ordinary program are
inlined, with every variable renamed: the same jitted function may be called twice and then
its jaxpr's variables would otherwise collide. Equations with their own differentiation
rule (custom_jvp_call, custom_vjp_call, cond, scan, while) stay whole.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.extend.core.primitives as prims
from jax._src import source_info_util
from jax.extend import core as jcore

# Calls whose body is inlined into the caller's program.
INLINED_CALLS = frozenset({prims.jit_p, prims.closed_call_p, prims.remat_p, prims.call_p})


@dataclasses.dataclass(eq=False)
class Var:
    """A variable of the flat program, numbered in order of creation."""

    id: int
    aval: Any

    def __repr__(self):
        return f"v{self.id}:{self.aval.str_short()}"


@dataclasses.dataclass(eq=False)
class Lit:
    """A constant of the flat program: a jaxpr literal or a closed-over value."""

    val: Any
    aval: Any


@dataclasses.dataclass(eq=False)
class Node:
    """One equation of the flat program.

    `eqn` is the original `JaxprEqn`; its primitive and params are what the forward pass
    binds. `composite` names a composite rule (for example "log_softmax") when the node
    stands for a whole `jax.nn` function kept as one call.
    """

    index: int
    eqn: Any
    invars: list
    outvars: list
    composite: str | None = None

    @property
    def primitive(self):
        return self.eqn.primitive

    @property
    def params(self):
        return self.eqn.params

    def where(self) -> str:
        """Return the user's source line of this equation, as `file:line (function)`."""
        return source_info_util.summarize(self.eqn.source_info)


@dataclasses.dataclass
class Program:
    """A flat program: input variables, nodes in execution order, output atoms."""

    invars: list
    nodes: list
    outvars: list


def _is_composite_call(eqn) -> str | None:
    """Return the composite rule's name when `eqn` is a jit call we treat as one node."""
    # Imported here to avoid a cycle: the composite rules import this module.
    from cpjax.rules.composite import match_composite

    if eqn.primitive is not prims.jit_p:
        return None
    return match_composite(eqn)


class _Builder:
    def __init__(self):
        self.nodes = []
        self._ids = itertools.count()

    def new_var(self, aval) -> Var:
        return Var(next(self._ids), aval)

    def inline(self, jaxpr, consts, in_atoms) -> list:
        """Append the equations of `jaxpr` with its inputs bound to `in_atoms`."""
        env = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = Lit(c, v.aval)
        for v, a in zip(jaxpr.invars, in_atoms, strict=True):
            env[v] = a

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return Lit(atom.val, atom.aval)
            return env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            composite = _is_composite_call(eqn)
            if eqn.primitive in INLINED_CALLS and composite is None:
                inner = _inner_closed_jaxpr(eqn)
                outs = self.inline(inner.jaxpr, inner.consts, ins)
            else:
                outs = [self.new_var(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(len(self.nodes), eqn, ins, outs, composite))
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [read(a) for a in jaxpr.outvars]


def _inner_closed_jaxpr(eqn):
    params = eqn.params
    inner = params.get("jaxpr", params.get("call_jaxpr"))
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner
    return jcore.ClosedJaxpr(inner, ())


def build_program(closed_jaxpr) -> Program:
    """Flatten `closed_jaxpr` into a `Program`, inlining plain calls."""
    builder = _Builder()
    invars = [builder.new_var(v.aval) for v in closed_jaxpr.jaxpr.invars]
    outs = builder.inline(closed_jaxpr.jaxpr, closed_jaxpr.consts, invars)
    return Program(invars, builder.nodes, outs)


def bind_node(node: Node, invals: list) -> list:
    """Evaluate one node on concrete or traced inputs and return its outputs as a list."""
    eqn = node.eqn
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def trace_program(fun, flat_args: list, in_tree) -> tuple[Program, Any]:
    """Trace `fun` (taking the unflattened args) to a flat `Program` and its output tree."""

    def flat_fun(*leaves):
        args = jax.tree_util.tree_unflatten(in_tree, leaves)
        return fun(*args)

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*flat_args)
    return build_program(closed), out_shape
