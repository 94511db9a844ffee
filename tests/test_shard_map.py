"""cpjax inside jax.shard_map with collectives, on a mesh of 8 host CPU devices.

The checks themselves are in `_shard_map_checks.py`. They run once, in a separate process,
because the number of host devices is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import _shard_map_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-m", "tests._shard_map_checks"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", [c.__name__ for c in _shard_map_checks.CHECKS])
def test_shard_map_check(results, check):
    assert results[check] == "ok", results[check]
