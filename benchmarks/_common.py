"""Helpers shared by the benchmark scripts: machine and source descriptions, MLP weights."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp


def load_average() -> float:
    """Return the 1-minute load average (NaN where the OS has none), a sign of competing work."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def describe_machine(load: float | None = None, extra: str = "") -> str:
    """Describe JAX, the device and the CPU, with the load average (measured now if None)."""
    device = jax.devices()[0]
    load = load_average() if load is None else load
    versions = f"jax {jax.__version__}" + (f", {extra}" if extra else "")
    return (f"{versions}, {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
            f"{platform.processor() or platform.machine()}, 1-minute load average {load:.2f}")


def describe_source() -> str:
    """Return the git commit of the checkout, marked dirty when cpjax/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "cpjax"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git not available)"
    return f"{commit} with uncommitted changes in cpjax/" if changes else commit


def init_mlp_params(key, sizes):
    """Draw MLP weights from N(0, 1/fan_in) (LeCun normal) and set the biases to zero."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for layer, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{layer + 1}"] = jax.random.normal(k, (fan_in, fan_out)) / math.sqrt(fan_in)
        params[f"b{layer + 1}"] = jnp.zeros(fan_out)
    return params
