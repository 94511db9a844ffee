"""The rule registry and what every curvature rule receives and returns.

A rule stands for one primitive (or one composite call). It answers two questions:

* statically, at trace time: what kind of local curvature the equation injects, given
  which inputs depend on the differentiated arguments and the sign of the cotangent
  (`Rule.curvature`);
* in the backward sweep: the injected vectors `F v` and `G v` for each input, for `K`
  probes at once (`Rule.inject`).

The linear part of every equation (its VJP) is not the rule's business: the sweep applies
it to the cotangent and to T and U alike.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any

import jax.numpy as jnp
from jax import lax

from cpjax import _probes, _schedule
from cpjax._trace import varying_axes


class Curvature(enum.Enum):
    """Static kind of an equation's local curvature `M`."""

    NONE = 0  # M = 0: nothing is injected.
    PSD = 1  # M is positive semi-definite for every value: F = G works.
    INDEFINITE = 2  # anything else.


@dataclasses.dataclass(frozen=True)
class StaticInfo:
    """Static facts about an equation that a rule receives at trace time.

    Attributes:
      deps: for each input, the set of differentiated leaves (indices) it depends on; an
        empty set means the input is a constant of the sweep.
      out_signs: for each output, the sign of its cotangent when known at trace time
        (+1 or -1), 0 when it receives no cotangent, None when unknown.
      prune: drop cross blocks between inputs whose leaf sets are disjoint (valid for the
        diagonal, not for the full Hessian).
      sliced: indices of a scan's `xs` inputs that are leaves, each entry of which lands in
        one step's slice, with no other input depending on those leaves (see
        `cpjax._analysis.sliced_inputs`).
    """

    deps: tuple
    out_signs: tuple
    prune: bool
    sliced: frozenset = frozenset()

    def dependent(self, i: int) -> bool:
        return bool(self.deps[i])

    def disjoint(self, i: int, j: int) -> bool:
        """Return whether the cross block between inputs i and j can be dropped."""
        return self.prune and not (self.deps[i] & self.deps[j])


@dataclasses.dataclass
class Context:
    """Values a rule receives in the backward sweep for one equation."""

    node: Any
    info: StaticInfo
    invals: list  # primal inputs
    outvals: list  # primal outputs
    ybar: list  # cotangent of each output, None where zero
    make_key: Any  # () -> PRNG key of this equation (see `key`)
    num_samples: int
    probe: str  # "rademacher" or "gaussian"
    symmetric: bool  # T = U mode: every injection must be PSD and only F v is used
    # The plan's curvature kind for this equation. It is NONE where the equation is silent
    # (the model part of a Gauss-Newton product), so structured rules must check it.
    kind: Curvature | None = None

    # Rows the probes are drawn after (a schedule hint, see `cpjax._schedule`), or None.
    wait_for: Any = None
    # `salt -> _probes._seed(key, salt)` read from the sweep's table, or None. It may return
    # None for a salt the table lacks, and the probes are then drawn from `key`.
    seed: Any = None
    # At a shard_map or scan: `{input index: site}` for the leaves whose diagonal the body forms in
    # the separable-axis form (`cpjax._separable`), and `(site, diagonal) -> None`, which
    # stores such a diagonal. The rule returns no rows for those inputs.
    body_sites: Any = None
    add_diagonal: Any = None

    @functools.cached_property
    def key(self):
        """PRNG key of this equation, formed when a rule first reads it.

        Most equations draw their probes from `seed` or draw none, and an unread key would
        still add its slice of the key table to the traced program.
        """
        return self.make_key()

    def draw(self, shape, dtype, salt: int = 0):
        """Draw `num_samples` probes of `shape`, independent for each `salt`."""
        full = (self.num_samples, *shape)
        seed = None
        if self.seed is not None and self.probe == "rademacher":
            seed = self.seed(salt)
        if seed is None:
            v = _probes.draw(self.key, full, dtype, self.probe, salt)
        else:
            v = _probes.rademacher_from_seed(seed, full, dtype)
        return v if self.wait_for is None else _schedule.after(v, self.wait_for)


class Rule:
    """Base class: a primitive whose local curvature is zero."""

    def curvature(self, node, info: StaticInfo) -> Curvature:
        return Curvature.NONE

    def inject(self, ctx: Context) -> list:
        """Return a list of `(input_index, F v, G v)`.

        `G v` is None when it equals `F v`. It is `STACKED` when the second item already
        contains `[F v; G v]`, stacked along the probe axis.
        """
        return []


# Marker for rows that a rule returns as `[F v; G v]`, stacked along the probe axis.
STACKED = "stacked"


class StructuredRule(Rule):
    """A rule that runs the whole backward step of its equation itself.

    Loops need this: the curvature injected at step t must travel back through steps
    t-1, ..., 0 together with the cotangent, so the linear part and the injections cannot be
    separated as for other equations.
    """

    def forward(self, node, vals) -> tuple:
        """Evaluate the node; return `(outputs, residuals)` for `backward`."""
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    def backward(self, ctx: Context, residuals, ybar: list, rows: list) -> tuple:
        """Return `(grads, rows)` for the node's dependent inputs, in order.

        `ybar` contains a cotangent for every float output (zeros where absent). `rows`
        contains the T (and U) rows arriving at each float output, None where zero.
        """
        raise NotImplementedError(f"{type(self).__name__} must define backward")


# Rules keyed by primitive object. Composite calls are keyed by their name string (a
# test checks that `jax.nn` still emits those names).
RULES: dict = {}
COMPOSITE_RULES: dict = {}


def register(rule: Rule, *primitives) -> None:
    for p in primitives:
        RULES[p] = rule


def zero_rows(n_rows, like):
    """Return zeros of shape `(n_rows, *like.shape)` that vary over the devices as `like` does.

    Inside a shard_map, JAX types each value with the mesh axes along which it differs
    between devices. VJPs and loops reject zeros typed as shared in place of such a value.
    """
    return vary_like(jnp.zeros((n_rows, *jnp.shape(like)), jnp.result_type(like)), like)


def vary_like(x, like):
    """Return `x`, marked as differing between devices along every mesh axis that `like` is."""
    axes = varying_axes(like) - varying_axes(x)
    return lax.pcast(x, tuple(sorted(axes, key=str)), to="varying") if axes else x


def safe_sqrt(x):
    """Return the square root of a floating-point `x`, with gradient 0, not NaN, at `x = 0`."""
    zero = lax.full_like(x, 0)
    positive = lax.gt(x, zero)
    return lax.select(positive, lax.sqrt(lax.select(positive, x, lax.full_like(x, 1))), zero)


def split_scalar_curvature(m, v):
    """Split an elementwise local curvature `m` symmetrically: `F v = √|m| v`, `G v = sign(m) F v`.

    This is the best choice among factorisations for a diagonal `M` (the symmetric split of
    Martens et al., 2012, equal to their complex-square-root variant).
    """
    # The root is formed on a flat vector. On shape (32, 16, 1), a layer norm's values per
    # row, XLA's CPU backend (jaxlib 0.10.2) unrolled the 16-wide inner loop in LLVM, and
    # such a kernel took about 50 ms to compile against 5 to 10 ms flat.
    root = safe_sqrt(jnp.abs(m).reshape(-1)).reshape(m.shape)
    fv = root * v
    return fv, jnp.sign(m) * fv


def sign_of_product(*signs):
    """Return the product of static signs, or None when one is unknown."""
    out = 1
    for s in signs:
        if s is None:
            return None
        out *= s
    return out
