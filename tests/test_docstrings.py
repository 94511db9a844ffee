"""Every docstring example runs and prints what it shows.

Examples of public functions run in an empty namespace, as in a user's fresh session.
Examples of internal helpers run with their module's names. All run with JAX's default
32-bit types, while the rest of the suite enables float64.
"""

import doctest
import importlib
import io
import pkgutil

import jax
import pytest

import cpjax

PUBLIC = {name for name in cpjax.__all__ if not name.startswith("_")}
PUBLIC_MODULES = {"cpjax.optax", "cpjax.score_matching"}


def _is_public(test) -> bool:
    module, _, name = test.name.rpartition(".")
    return module in PUBLIC_MODULES or name in PUBLIC


def _examples():
    finder = doctest.DocTestFinder()
    names = [m.name for m in pkgutil.walk_packages(cpjax.__path__, "cpjax.")]
    for name in ["cpjax", *names]:
        module = importlib.import_module(name)
        for test in finder.find(module):
            if test.examples and test.name.startswith(name):
                if _is_public(test):
                    test.globs = {}
                yield pytest.param(test, id=test.name)


@pytest.mark.parametrize("test", list(_examples()))
def test_docstring_example(test):
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with jax.enable_x64(False):
        result = runner.run(test, out=out.write)
    assert result.failed == 0, out.getvalue()
