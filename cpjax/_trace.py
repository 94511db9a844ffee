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
import numpy as np
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
    stands for a whole `jax.nn` function kept as one call. `caller` is the source info of
    the innermost inlined call that has a line of the user's code, for equations inside a
    JAX library function (`jnp.linalg.solve` is a jitted function).
    """

    index: int
    eqn: Any
    invars: list
    outvars: list
    composite: str | None = None
    caller: Any = None

    @property
    def primitive(self):
        return self.eqn.primitive

    @property
    def params(self):
        return self.eqn.params

    def where(self) -> str:
        """Return the user's source line of this equation, as `file:line (function)`.

        For an equation inside a JAX library function, the line that calls the function.
        """
        where = source_info_util.summarize(self.eqn.source_info)
        if where:
            return where
        if self.caller is not None:
            return f"{source_info_util.summarize(self.caller)}, inside a JAX library function"
        return "an unknown source line (inside a JAX library function)"


@dataclasses.dataclass
class Program:
    """A flat program: input variables, nodes in execution order, output atoms.

    The first `silent` nodes inject no curvature (the model part of a Gauss-Newton
    product, see `Composition`).
    """

    invars: list
    nodes: list
    outvars: list
    silent: int = 0


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

    def inline(self, jaxpr, consts, in_atoms, caller=None) -> list:
        """Append the equations of `jaxpr` with its inputs bound to `in_atoms`.

        `caller` is the source info of the innermost call with a line of the user's code.
        """
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
                user_line = source_info_util.summarize(eqn.source_info)
                outs = self.inline(inner.jaxpr, inner.consts, ins,
                                   eqn.source_info if user_line else caller)
            else:
                outs = [self.new_var(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(len(self.nodes), eqn, ins, outs, composite, caller))
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


def build_grouped_program(closed_jaxpr) -> Program:
    """Flatten `closed_jaxpr` like `build_program`, then group softmaxes and chains.

    Used for the bodies of loops and branches, so that they get the same grouped nodes as
    the top-level program.
    """
    return _fuse_groups(build_program(closed_jaxpr))


def variable_uses(program: Program) -> dict:
    """Map each variable to its uses: `(node, input index)`, or `(None, 0)` for an output."""
    uses = {}
    for node in program.nodes:
        for i, atom in enumerate(node.invars):
            if isinstance(atom, Var):
                uses.setdefault(atom, []).append((node, i))
    for atom in program.outvars:
        if isinstance(atom, Var):
            uses.setdefault(atom, []).append((None, 0))
    return uses


def bind_node(node: Node, invals: list) -> list:
    """Evaluate one node on concrete or traced inputs and return its outputs as a list."""
    eqn = node.eqn
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def replace_nodes(program: Program, replacements: dict, dropped: set) -> Program:
    """Return `program` with node `i` replaced by `replacements[i]` and `dropped` removed.

    Nodes are renumbered in order; the silent prefix keeps every node it held.
    """
    nodes, silent = [], 0
    for node in program.nodes:
        if node.index in dropped:
            continue
        nodes.append(replacements.get(node.index, node))
        if node.index < program.silent:
            silent = len(nodes)
    for index, node in enumerate(nodes):
        node.index = index
    return Program(program.invars, nodes, program.outvars, silent)


def call_node(x: Var, group: list, name: str, composite: str) -> Node:
    """Return one node that calls a jitted function named `name` running `group` on `x`.

    `group` lists nodes in program order, and `x` is their only variable input from outside
    the group. The call returns the last node's output and carries that node's source line.
    """

    def run(value):
        env = {x: value}
        for node in group:
            args = [env[a] if isinstance(a, Var) else a.val for a in node.invars]
            env[node.outvars[0]] = bind_node(node, args)[0]
        return env[group[-1].outvars[0]]

    run.__name__ = run.__qualname__ = name
    closed = jax.make_jaxpr(jax.jit(run))(jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype))
    (eqn,) = closed.jaxpr.eqns
    eqn = eqn.replace(source_info=group[-1].eqn.source_info)
    return Node(group[-1].index, eqn, [x], list(group[-1].outvars), composite=composite,
                caller=group[-1].caller)


@dataclasses.dataclass(frozen=True)
class Composition:
    """`loss_fn(model_fn(*args[:-1]), *args[-1])`, traced with the model's nodes silent.

    Injecting curvature only in the loss gives the generalised Gauss-Newton matrix
    `Jᵀ ∇²loss J` in place of the Hessian.
    """

    model_fn: Any
    loss_fn: Any

    def __call__(self, *args):
        return self.loss_fn(self.model_fn(*args[:-1]), *args[-1])

    def trace(self, flat_args, in_tree):
        args = jax.tree_util.tree_unflatten(in_tree, flat_args)
        model_args, loss_args = args[:-1], tuple(args[-1])
        n_model = len(jax.tree_util.tree_leaves(model_args))
        model_leaves, loss_leaves = flat_args[:n_model], flat_args[n_model:]
        model_tree = jax.tree_util.tree_structure(model_args)
        loss_tree = jax.tree_util.tree_structure(loss_args)

        def model_flat(*leaves):
            return self.model_fn(*jax.tree_util.tree_unflatten(model_tree, leaves))

        model_jaxpr, z_shape = jax.make_jaxpr(model_flat, return_shape=True)(*model_leaves)
        z_leaves, z_tree = jax.tree_util.tree_flatten(z_shape)

        def loss_flat(*leaves):
            z = jax.tree_util.tree_unflatten(z_tree, leaves[:len(z_leaves)])
            rest = jax.tree_util.tree_unflatten(loss_tree, leaves[len(z_leaves):])
            return self.loss_fn(z, *rest)

        loss_jaxpr, out_shape = jax.make_jaxpr(loss_flat, return_shape=True)(
            *z_leaves, *loss_leaves)
        builder = _Builder()
        in_avals = [v.aval for v in model_jaxpr.jaxpr.invars]
        in_avals += [v.aval for v in loss_jaxpr.jaxpr.invars[len(z_leaves):]]
        invars = [builder.new_var(aval) for aval in in_avals]
        z_atoms = builder.inline(model_jaxpr.jaxpr, model_jaxpr.consts, invars[:n_model])
        silent = len(builder.nodes)
        outs = builder.inline(loss_jaxpr.jaxpr, loss_jaxpr.consts, z_atoms + invars[n_model:])
        program = Program(invars, builder.nodes, outs, silent)
        return _fuse_groups(program), out_shape


def trace_program(fun, flat_args: list, in_tree) -> tuple[Program, Any]:
    """Trace `fun` (taking the unflattened args) to a flat `Program` and its output tree."""
    if isinstance(fun, Composition):
        return fun.trace(flat_args, in_tree)
    # Python values (strings, ints, callables) stay concrete, as jax.grad keeps them.
    traced = [i for i, x in enumerate(flat_args) if _is_array(x)]

    def flat_fun(*leaves):
        merged = list(flat_args)
        for i, leaf in zip(traced, leaves, strict=True):
            merged[i] = leaf
        return _check_array_outputs(fun(*jax.tree_util.tree_unflatten(in_tree, merged)))

    closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(
        *[flat_args[i] for i in traced])
    program = _fuse_groups(build_program(closed))
    # Placeholder variables for the concrete leaves keep positions aligned with flat_args.
    invars = iter(program.invars)
    program.invars = [next(invars) if _is_array(x) else Var(-1 - i, None)
                      for i, x in enumerate(flat_args)]
    return program, out_shape


def _check_array_outputs(out):
    """Return `out`, raising a `TypeError` that names any leaf that is not an array."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if not (hasattr(leaf, "aval") or isinstance(leaf, (int, float, np.ndarray, np.generic))):
            raise TypeError(
                f"cpjax traces the function with jax.jit, so every value it returns (aux "
                f"included) must be an array, but output{jax.tree_util.keystr(path)} is a "
                f"{type(leaf).__name__}: {leaf!r}. Return it some other way, or as an array."
            )
    return out


def _fuse_groups(program: Program) -> Program:
    """Keep written-out softmaxes, then elementwise chains, as one node each."""
    # Imported here because both modules import this one.
    from cpjax._chains import fuse_elementwise_chains
    from cpjax._softmax import fuse_softmax

    return fuse_elementwise_chains(fuse_softmax(program))


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))
