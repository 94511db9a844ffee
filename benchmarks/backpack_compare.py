"""The Hessian diagonal from cpjax next to BackPACK's exact DiagHessian, on one MLP.

The model and data are those of `benchmarks/paper.py`: scikit-learn's 8x8 digits (all
1,797 images by default, pixels standardized), a tanh MLP 64 -> 32 -> 10 with mean softmax
cross-entropy, and weights drawn by `init_mlp_params(jax.random.key(0), ...)`. The same
weights are copied into a `torch.nn.Sequential(Linear, Tanh, Linear)`.

Methods, each computing the whole diagonal from the parameters and the data:

* BackPACK's `DiagHessian` extension (exact): forward pass, then `loss.backward()` inside
  `with backpack(DiagHessian())`;
* `cpjax.exact_hessian_diag` (exact, one Hessian-vector product per parameter);
* `cpjax.cp_hessian_diag` with K = 1, 10 and 100 probes, separable batch axis;
* for scale, one gradient in each framework: `loss.backward()` in PyTorch and
  `jax.value_and_grad` in JAX.

The JAX functions run under `jax.jit`, compiled before timing. Every method is called
once untimed, then all are called in a new random order in each repetition, and the
table gives medians. Each method's diagonal is compared with the diagonal of the full
Hessian from `jax.hessian` in float64, an independent reference. The error of CP is the
mean over `--seeds` probe keys.

BackPACK and PyTorch are optional dependencies: install them with
`pip install -e ".[backpack]"` (a CPU build of PyTorch 2.13.0 and backpack-for-pytorch).

Run from the repository root:

    python benchmarks/backpack_compare.py [--repeats 20] [--dtype float64] [--seeds 5]

It prints a markdown table and writes `backpack_compare.json` to `--out`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from _common import describe_machine, describe_source, init_mlp_params, load_average
from jax.flatten_util import ravel_pytree
from paper import load_batch, mlp_loss

import cpjax

# PyTorch's OpenMP threads spin while they wait for work. Next to JAX's own thread pool on
# two cores, that made a float32 `loss.backward()` here 60 times slower (120 ms against
# 2 ms). Passive waiting must be set before PyTorch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import backpack
    import torch
    from backpack import extend
    from backpack.extensions import DiagHessian
except ImportError as err:
    raise SystemExit(
        f"benchmarks/backpack_compare.py needs PyTorch and BackPACK, which are not installed "
        f"({err}). Install them with: pip install -e \".[backpack]\"") from err

# BackPACK's extensions hook every module's backward pass. PyTorch warns on each call that
# such a hook fires although the inputs do not require gradients, which is expected here.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
PROBE_COUNTS = (1, 10, 100)
BACKPACK_NAME = "BackPACK DiagHessian (exact)"
EXACT_NAME = "cpjax.exact_hessian_diag (exact)"
TORCH_GRADIENT = "PyTorch loss.backward() (gradient only)"
JAX_GRADIENT = "jax.value_and_grad (gradient only)"


def cp_name(num_samples: int) -> str:
    return f"cpjax.cp_hessian_diag, K={num_samples}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed calls per method, after one untimed call (default 20)")
    parser.add_argument("--batch", type=int, default=1797,
                        help="number of digits examples in the loss (default 1797, the whole "
                             "set)")
    parser.add_argument("--hidden", type=int, default=32,
                        help="width of the tanh hidden layer (default 32)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="floating-point type of both frameworks' computations. The "
                             "reference diagonal is always float64 (default float64)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="probe keys over which CP's relative error is averaged (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder for backpack_compare.json (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "hidden", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------------------------------
# The two frameworks


def torch_model(params, dtype):
    """Return `Sequential(Linear, Tanh, Linear)` holding the JAX MLP's weights.

    JAX computes `x @ w + b` with `w` of shape (in, out), and `torch.nn.Linear` computes
    `x @ weight.T + bias` with `weight` of shape (out, in), so each `w` is transposed.
    """
    # The layers are created in `dtype`: copying float64 weights into float32 layers and
    # converting afterwards would round them to float32.
    hidden, classes = params["w1"].shape[1], params["w2"].shape[1]
    model = torch.nn.Sequential(
        torch.nn.Linear(params["w1"].shape[0], hidden, dtype=dtype), torch.nn.Tanh(),
        torch.nn.Linear(hidden, classes, dtype=dtype))
    with torch.no_grad():
        for layer, index in ((model[0], 1), (model[2], 2)):
            layer.weight.copy_(torch.from_numpy(np.array(params[f"w{index}"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.array(params[f"b{index}"])))
    return model


def torch_diag_in_jax_order(model) -> np.ndarray:
    """Return the model's `diag_h` raveled in the order of `ravel_pytree` over w1, b1, w2, b2.

    `ravel_pytree` sorts the dictionary keys (b1, b2, w1, w2) and ravels each array in
    row-major order. The torch weights are transposed back to the JAX layout first.
    """
    first, last = model[0], model[2]
    leaves = {"b1": first.bias.diag_h, "b2": last.bias.diag_h,
              "w1": first.weight.diag_h.T, "w2": last.weight.diag_h.T}
    return np.concatenate([leaves[name].detach().numpy().ravel()
                           for name in sorted(leaves)]).astype(np.float64)


def make_diag_hessian_call(model, inputs, labels):
    """Return a no-argument call that runs BackPACK's DiagHessian on an extended `model`."""
    loss_function = extend(torch.nn.CrossEntropyLoss(reduction="mean"))
    parameters = list(model.parameters())

    def diag_hessian():
        model.zero_grad()
        loss = loss_function(model(inputs), labels)
        with backpack.backpack(DiagHessian()):
            loss.backward()
        return [p.diag_h for p in parameters]

    return diag_hessian


def make_gradient_call(model, inputs, labels):
    """Return a no-argument call of `loss.backward()` on a plain, not extended, `model`."""
    loss_function = torch.nn.CrossEntropyLoss(reduction="mean")
    parameters = list(model.parameters())

    def gradient():
        model.zero_grad()
        loss_function(model(inputs), labels).backward()
        return [p.grad for p in parameters]

    return gradient


def make_jax_calls(params, inputs, labels) -> dict:
    """Return name -> no-argument call of a compiled JAX function returning a flat array."""
    key = jax.random.key(1)

    def flat(fn):
        compiled = jax.jit(lambda p, x, y, k: ravel_pytree(fn(p, x, y, k))[0]).lower(
            params, inputs, labels, key).compile()
        return lambda: compiled(params, inputs, labels, key)

    exact = cpjax.exact_hessian_diag(mlp_loss)
    calls = {EXACT_NAME: flat(lambda p, x, y, k: exact(p, x, y))}
    for num_samples in PROBE_COUNTS:
        cp = cpjax.cp_hessian_diag(mlp_loss, num_samples=num_samples, separable=True)
        calls[cp_name(num_samples)] = flat(lambda p, x, y, k, cp=cp: cp(p, x, y, key=k))
    calls[JAX_GRADIENT] = flat(lambda p, x, y, k: jax.value_and_grad(mlp_loss)(p, x, y)[1])
    return calls


# ---------------------------------------------------------------------------------------
# Measurements


def block(result):
    """Wait for a JAX result; PyTorch on the CPU returns finished tensors already."""
    if isinstance(result, jax.Array):
        result.block_until_ready()
    return result


def time_interleaved(calls: dict, repeats: int, seed: int = 0) -> dict:
    """Return name -> list of call times in seconds, in a new random order per repetition."""
    for call in calls.values():
        block(call())
    rng = np.random.default_rng(seed)
    names = list(calls)
    times = {name: [] for name in names}
    for _ in range(repeats):
        for index in rng.permutation(len(names)):
            started = time.perf_counter()
            block(calls[names[index]]())
            times[names[index]].append(time.perf_counter() - started)
    return times


def relative_error(estimate, reference) -> float:
    return float(np.linalg.norm(np.asarray(estimate, np.float64) - reference)
                 / np.linalg.norm(reference))


def reference_diagonal(params, inputs, labels) -> np.ndarray:
    """Return the diagonal of the full float64 Hessian of the raveled loss (`jax.hessian`)."""
    params64 = jax.tree.map(lambda a: a.astype(np.float64), params)
    flat, unravel = ravel_pytree(params64)
    inputs64 = inputs.astype(np.float64)
    hessian = jax.jit(jax.hessian(lambda v: mlp_loss(unravel(v), inputs64, labels)))(flat)
    return np.diag(np.asarray(hessian))


def cp_errors(params, inputs, labels, reference, seeds: int) -> dict:
    """Return name -> mean over `seeds` keys of the relative error of one CP call."""
    errors = {}
    for num_samples in PROBE_COUNTS:
        cp = jax.jit(cpjax.cp_hessian_diag(mlp_loss, num_samples=num_samples))
        values = [relative_error(ravel_pytree(cp(params, inputs, labels,
                                                 key=jax.random.key(100 + seed)))[0], reference)
                  for seed in range(seeds)]
        errors[cp_name(num_samples)] = float(np.mean(values))
    return errors


def format_table(times: dict, errors: dict) -> str:
    medians = {name: float(np.median(values)) for name, values in times.items()}
    backpack_time = medians[BACKPACK_NAME]
    lines = ["| method | median ms | min ms | × BackPACK DiagHessian "
             "| relative error ‖d − d*‖ / ‖d*‖ |",
             "|---|---:|---:|---:|---:|"]
    for name, seconds in medians.items():
        error = errors.get(name)
        error_cell = "" if error is None else f"{error:.3g}"
        lines.append(f"| {name} | {1e3 * seconds:.2f} | {1e3 * min(times[name]):.2f} "
                     f"| {seconds / backpack_time:.3f} | {error_cell} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    # float64 is needed for the reference, whatever --dtype the methods use.
    jax.config.update("jax_enable_x64", True)
    command = "python " + shlex.join(
        sys.argv if argv is None else ["benchmarks/backpack_compare.py", *argv])
    versions = (f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
                f"backpack-for-pytorch {importlib.metadata.version('backpack-for-pytorch')}")
    load_at_start = load_average()
    machine_at_start = describe_machine(load_at_start, extra=versions)
    started = time.perf_counter()

    inputs, labels = load_batch(args.batch)
    params = init_mlp_params(jax.random.key(0), (inputs.shape[1], args.hidden, 10))
    reference = reference_diagonal(params, inputs, labels)

    dtype = np.dtype(args.dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    inputs = inputs.astype(dtype)
    torch_dtype = {np.dtype("float64"): torch.float64, np.dtype("float32"): torch.float32}[dtype]
    torch_inputs = torch.from_numpy(np.array(inputs))
    torch_labels = torch.from_numpy(np.array(labels).astype(np.int64))
    model = extend(torch_model(params, torch_dtype))
    diag_hessian = make_diag_hessian_call(model, torch_inputs, torch_labels)
    gradient = make_gradient_call(torch_model(params, torch_dtype), torch_inputs, torch_labels)

    jax_calls = make_jax_calls(params, inputs, labels)

    diag_hessian()
    errors = {BACKPACK_NAME: relative_error(torch_diag_in_jax_order(model), reference),
              EXACT_NAME: relative_error(jax_calls[EXACT_NAME](), reference)}
    errors.update(cp_errors(params, inputs, labels, reference, args.seeds))

    calls = {BACKPACK_NAME: diag_hessian, **jax_calls, TORCH_GRADIENT: gradient}
    times = time_interleaved(calls, args.repeats)
    medians = {name: float(np.median(times[name])) for name in calls}
    wall_time = time.perf_counter() - started
    machine_at_end = describe_machine(extra=versions)

    num_params = reference.size
    print(f"Command: `{command}`\n")
    print(f"Hessian diagonal of the mean softmax cross-entropy of a tanh MLP "
          f"64-{args.hidden}-10 ({num_params:,} parameters) on {args.batch} digits images, "
          f"{args.dtype} in both frameworks. Median of {args.repeats} interleaved calls; "
          f"relative error against the diagonal of the float64 `jax.hessian` (CP: mean over "
          f"{args.seeds} probe keys).\n")
    print(format_table(times, errors))
    print(f"\nMachine at start: {machine_at_start}")
    print(f"Machine at end:   {machine_at_end}")
    print(f"cpjax source: {describe_source()}")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "machine_at_start": machine_at_start,
              "machine_at_end": machine_at_end, "cpjax_source": describe_source(),
              "wall_time_s": wall_time, "dtype": args.dtype, "batch": args.batch,
              "hidden": args.hidden, "num_params": int(num_params), "seeds": args.seeds,
              "median_s": medians, "times_s": times,
              "relative_error": {name: error for name, error in errors.items()}}
    path = args.out / "backpack_compare.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
