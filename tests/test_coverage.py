"""Every differentiable lax primitive has a rule or a documented place on the fallback list."""

from __future__ import annotations

import pathlib

from jax import lax

from cpjax import rules
from cpjax.rules.composite import match_composite
from cpjax.rules.fallback import FALLBACK_PRIMITIVES

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def lax_primitives():
    return {getattr(lax, n) for n in dir(lax) if n.endswith("_p")}


def test_every_lax_primitive_covered():
    uncovered = sorted(
        p.name for p in lax_primitives()
        if not rules.has_rule(p) and p.name not in FALLBACK_PRIMITIVES
    )
    assert uncovered == [], f"no rule and not on the documented fallback list: {uncovered}"


def test_fallback_list_names_real_primitives():
    names = {p.name for p in lax_primitives()}
    assert set(FALLBACK_PRIMITIVES) <= names


def test_fallback_list_gives_reasons():
    for name, reason in FALLBACK_PRIMITIVES.items():
        assert len(reason) > 20, name


def test_fallback_primitives_have_no_rule():
    for p in lax_primitives():
        if p.name in FALLBACK_PRIMITIVES:
            assert not rules.has_rule(p), p.name


def test_composite_names_still_emitted():
    """The composite rules key on jit names that jax.nn must still emit."""
    import jax
    import jax.numpy as jnp

    jaxpr = jax.make_jaxpr(jax.nn.log_softmax)(jnp.ones((2, 3)))
    calls = [e for e in jaxpr.eqns if e.primitive.name == "jit"]
    assert [match_composite(e) for e in calls] == ["log_softmax"]
    jaxpr = jax.make_jaxpr(jax.nn.silu)(jnp.ones((2, 3)))
    calls = [e for e in jaxpr.eqns if e.primitive.name == "jit"]
    assert [match_composite(e) for e in calls] == ["elementwise"]


def test_readme_lists_registry():
    """The README's table of supported primitives is generated from the registry."""
    text = README.read_text()
    begin, end = "<!-- primitives:begin -->", "<!-- primitives:end -->"
    listed = text.split(begin)[1].split(end)[0].strip()
    assert listed == rules.supported_primitives_markdown(), (
        "README.md is out of date: regenerate it with "
        "python -c 'import cpjax.rules as r; print(r.supported_primitives_markdown())'"
    )
