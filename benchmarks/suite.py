"""Cost of CP Hessian-diagonal estimates across models, sizes and probe counts.

For an MLP, a CNN and a one-block transformer, each at about 10k, 0.4M and 10M parameters,
and for K = 1, 10 and 100 probes, measures under `jax.jit` in float32:

* wall time of `cpjax.cp_hessian_diag(loss, num_samples=K, separable=True)`, divided by the
  time of `jax.value_and_grad(loss)` and by that of
  `cpjax.hutchinson_hessian_diag(loss, num_samples=K)`;
* the extra cost of each probe beyond the first, `(t_K - t_1) / (K - 1)`, in units of the
  `value_and_grad` time;
* compile time: `jax.jit(method).lower(*args)` (tracing, including cpjax's analysis of the
  program, and lowering to StableHLO) plus `.compile()` (XLA), the median of
  `--compile-repeats` runs from empty JAX caches, divided by the same for `value_and_grad`.
  Each method's runs take place in a new Python process of its own (see `compile_methods`);
* peak memory from XLA's compiled memory analysis: temporaries plus arguments plus outputs,
  less the bytes of outputs aliased to arguments, divided by the same for
  `value_and_grad`;
* the floating-point operation count of XLA's cost analysis, divided by `value_and_grad`'s;
* per call, the memory the operating system hands the process afresh (minor page faults
  times the page size) and the CPU time spent in the kernel. XLA's CPU runtime allocates a
  call's temporaries anew on every call. glibc maps a block above its mmap threshold (at
  most 32 MiB) afresh each time, and the kernel zeroes every page of it on first touch. See
  "Fresh memory" in the README. Both are left empty where Python has no `resource` module
  (Windows).

Methods are timed through their compiled executables. Per model and size, every method
is called once untimed. Then, in rounds, the methods are called in a new random order
each round, so that drifts in machine load fall on all of them alike, and the ratios
divide medians. A method takes part in a round until it has `--min-repeats` calls and its
timed seconds reach an equal share of `--budget` (or it has `--max-repeats` calls), so
cheap methods get more calls than expensive ones. A method whose compiled peak memory
exceeds `--max-memory-gib` is not run. A method whose untimed call takes longer than
`--max-call-seconds` is not repeated, and its one call is reported.

With `--profile N`, N more calls of value_and_grad and of CP with K up to 10 are traced
with `jax.profiler`, and the XLA op time is split into matrix products, convolutions and
other operations by JAX primitive.

Run from the repository root:

    python benchmarks/suite.py                    # all models, sizes and K
    python benchmarks/suite.py --skip-largest     # without K = 100 at about 10M parameters
    python benchmarks/suite.py --quick            # smoke run, 48 s on two cores
    python benchmarks/suite.py --models mlp --sizes small,medium --probes 1,10

It prints markdown tables and writes `suite.json` and `suite.png` to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import gzip
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from _common import (
    cnn_logits,
    cross_entropy,
    describe_machine,
    describe_source,
    finite_or_none,
    init_cnn_params,
    init_mlp_params,
    init_transformer_params,
    load_average,
    mlp_logits,
    transformer_logits,
)

import cpjax

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
MODELS = ("mlp", "cnn", "transformer")
SIZES = ("small", "medium", "large")
PROBE_COUNTS = (1, 10, 100)
BASELINE = "value_and_grad"
MIB = 2 ** 20

# Cost targets checked at the end: one CP probe costs at most ONE_PROBE_TARGET[model]
# value_and_grad calls, each further probe EXTRA_PROBE_TARGET, compilation COMPILE_TARGET
# times value_and_grad's, and the peak memory of one probe MEMORY_TARGET times.
ONE_PROBE_TARGET = {"mlp": 1.5, "cnn": 2.0, "transformer": 2.0}
EXTRA_PROBE_TARGET = 1.4
COMPILE_TARGET = 3.0
MEMORY_TARGET = 2.0

# Model dimensions and batch sizes. The batch shrinks as the model grows, so that one
# value_and_grad call costs between about 1 and 50 ms on two CPU cores. The default run took
# 10 minutes on two cores at load average 2 to 3. The CNN's large size keeps the
# convolutions small and puts most parameters in the dense layer after them, as
# AlexNet-style networks do. 10M convolution weights applied at 8x8 positions would cost
# about 4 GFLOP per example for one gradient, 64 times a dense layer of that size.
SPECS = {
    "mlp": {
        "small": {"widths": (64, 64, 64, 10), "batch": 512},
        "medium": {"widths": (256, 512, 512, 10), "batch": 128},
        "large": {"widths": (1024, 2560, 2560, 10), "batch": 32},
    },
    "cnn": {
        "small": {"image_size": 8, "in_channels": 1, "channels": (16, 32), "hidden": 32,
                  "batch": 256},
        "medium": {"image_size": 16, "in_channels": 3, "channels": (32, 64), "hidden": 384,
                   "batch": 64},
        "large": {"image_size": 16, "in_channels": 3, "channels": (64, 128), "hidden": 4608,
                  "batch": 16},
    },
    "transformer": {
        "small": {"vocab_size": 32, "context": 16, "width": 24, "heads": 4, "batch": 32},
        "medium": {"vocab_size": 64, "context": 32, "width": 192, "heads": 3, "batch": 8},
        "large": {"vocab_size": 64, "context": 16, "width": 896, "heads": 14, "batch": 2},
    },
}


# ---------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Case:
    """One model at one size: the loss, its parameters and a fixed random batch."""

    model: str
    size: str
    description: str
    loss: Callable  # loss(params, *data) -> scalar
    params: dict
    data: tuple
    batch: int

    @property
    def num_params(self) -> int:
        return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params)))


def build_mlp(key, size, widths, batch) -> Case:
    params_key, inputs_key, labels_key = jax.random.split(key, 3)
    params = init_mlp_params(params_key, widths)
    inputs = jax.random.normal(inputs_key, (batch, widths[0]))
    labels = jax.random.randint(labels_key, (batch,), 0, widths[-1])

    def loss(params, inputs, labels):
        return cross_entropy(mlp_logits(params, inputs), labels)

    description = f"tanh MLP {'-'.join(map(str, widths))}"
    return Case("mlp", size, description, loss, params, (inputs, labels), batch)


def build_cnn(key, size, image_size, in_channels, channels, hidden, batch) -> Case:
    params_key, inputs_key, labels_key = jax.random.split(key, 3)
    flat_size = (image_size // 4) ** 2 * channels[1]
    params = init_cnn_params(params_key, in_channels, channels, flat_size, hidden)
    images = jax.random.normal(inputs_key, (batch, image_size, image_size, in_channels))
    labels = jax.random.randint(labels_key, (batch,), 0, 10)

    def loss(params, images, labels):
        return cross_entropy(cnn_logits(params, images), labels)

    description = (f"CNN {image_size}x{image_size}x{in_channels} conv3x3x{channels[0]}-tanh-"
                   f"pool-conv3x3x{channels[1]}-tanh-pool-dense{hidden}-tanh-dense10")
    return Case("cnn", size, description, loss, params, (images, labels), batch)


def build_transformer(key, size, vocab_size, context, width, heads, batch) -> Case:
    params_key, tokens_key = jax.random.split(key)
    params = init_transformer_params(params_key, vocab_size, context, width, blocks=1)
    tokens = jax.random.randint(tokens_key, (batch, context + 1), 0, vocab_size)

    def loss(params, tokens):
        return cross_entropy(transformer_logits(params, tokens, heads), tokens[:, 1:])

    description = (f"1-block pre-LN transformer, width {width}, {heads} heads, GELU MLP "
                   f"{4 * width}, context {context}, vocabulary {vocab_size}")
    return Case("transformer", size, description, loss, params, (tokens,), batch)


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "transformer": build_transformer}


def build_case(model: str, size: str, seed: int = 0) -> Case:
    return BUILDERS[model](jax.random.key(seed), size, **SPECS[model][size])


# ---------------------------------------------------------------------------------------
# Methods, compilation and timing


@dataclasses.dataclass
class Measurement:
    """Compile statistics and call times of one method on one case."""

    lower_s: float
    compile_s: float
    peak_bytes: int
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    first_call_s: float = math.nan
    times_s: list = dataclasses.field(default_factory=list)
    fresh_bytes: list = dataclasses.field(default_factory=list)  # pages faulted in, per call
    kernel_s: list = dataclasses.field(default_factory=list)  # system CPU time, per call
    skipped: str = ""  # why the method was not run, or ran only once

    @property
    def compile_total_s(self) -> float:
        return self.lower_s + self.compile_s

    @property
    def median_s(self) -> float:
        return float(np.median(self.times_s)) if self.times_s else math.nan

    @property
    def median_fresh_mib(self) -> float:
        return float(np.median(self.fresh_bytes)) / MIB if self.fresh_bytes else math.nan

    @property
    def median_kernel_ms(self) -> float:
        return 1e3 * float(np.median(self.kernel_s)) if self.kernel_s else math.nan


def method_name(kind: str, num_samples: int | None = None) -> str:
    return BASELINE if kind == BASELINE else f"{kind}, K={num_samples}"


def make_methods(loss, probe_counts) -> dict:
    """Return name -> `fn(params, data, key)`, a fresh `jax.jit` wrapper per method."""

    def value_and_grad(params, data, key):
        del key  # one signature for every method
        return jax.value_and_grad(loss)(params, *data)

    methods = {BASELINE: jax.jit(value_and_grad)}
    for num_samples in probe_counts:
        cp = cpjax.cp_hessian_diag(loss, num_samples=num_samples, separable=True)
        hutchinson = cpjax.hutchinson_hessian_diag(loss, num_samples=num_samples)
        methods[method_name("CP", num_samples)] = jax.jit(
            lambda params, data, key, cp=cp: cp(params, *data, key=key))
        methods[method_name("Hutchinson", num_samples)] = jax.jit(
            lambda params, data, key, hutchinson=hutchinson: hutchinson(params, *data, key=key))
    return methods


def _cost_entry(cost, name: str) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX returns one dictionary per device
        cost = cost[0] if cost else {}
    return float((cost or {}).get(name, math.nan))


def compile_methods(case: Case, methods: dict, args, options, order_rng) -> tuple[dict, dict]:
    """Lower and compile every method, and return name -> executable, name -> Measurement.

    The compile times are the median of `options.compile_repeats` runs, each from empty JAX
    caches. By default each method's runs take place in a process of its own that has
    compiled nothing else (`--compile-in children`). Compiling slows down as a process
    compiles more programs, and not by the same factor for every program. On the 10k
    transformer in one process, value_and_grad took 0.69 s at first and 0.73 to 0.81 s
    after CP and Hutchinson had compiled, while CP with K = 100 took 2.08 to 2.16 s
    throughout. With each method's runs in a row in one process, value_and_grad first, the
    ratio of the two came out at 3.15. In rounds of a random order it came out at 2.63, and
    in fresh processes at 2.83. `--compile-in process` runs the rounds in this process, which
    is faster.
    """
    names = list(methods)
    in_process = options.compile_in == "process"
    executables, runs = {}, {name: [] for name in names}
    for _ in range(options.compile_repeats if in_process else 1):
        for index in order_rng.permutation(len(names)):
            name = names[index]
            executables[name], seconds = _timed_compile(methods[name], args)
            runs[name].append(seconds)
    if not in_process:
        # The compilation above only gives the executable, and the children the times.
        for index in order_rng.permutation(len(names)):
            name = names[index]
            runs[name] = _compile_in_child(case, name, options.compile_repeats)
    return executables, {name: _measure_compiled(executables[name], runs[name])
                         for name in names}


def _timed_compile(fn, args):
    """Return the executable of `fn` for `args` and `(total s, lowering s)`, from empty caches."""
    jax.clear_caches()
    gc.collect()
    started = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    executable = lowered.compile()
    return executable, (time.perf_counter() - started, lowered_at - started)


def _compile_in_child(case: Case, name: str, repeats: int) -> list:
    """Return the `(total s, lowering s)` of `repeats` compilations in a new Python process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--compile-child",
               case.model, case.size, name, "--compile-repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"compiling {name} for {case.model} {case.size} in a child process failed with "
            f"exit code {done.returncode}. Run `{shlex.join(command)}` to see the whole error, "
            f"or pass --compile-in process. The end of its error output:\n{done.stderr[-3000:]}")
    return [tuple(run) for run in json.loads(done.stdout.strip().splitlines()[-1])]


def _run_compile_child(model: str, size: str, name: str, repeats: int) -> None:
    """Compile one method of one case `repeats` times and print the seconds as JSON."""
    case = build_case(model, size)
    count = name.partition(", K=")[2]
    probe_counts = [int(count)] if count.isdigit() else []
    methods = make_methods(case.loss, probe_counts)
    if name not in methods:
        raise SystemExit(f"method {name!r} not found; expected one of {sorted(methods)}")
    args = (case.params, case.data, jax.random.key(1))
    print(json.dumps([_timed_compile(methods[name], args)[1] for _ in range(repeats)]))


def _measure_compiled(compiled, runs) -> Measurement:
    """Return the Measurement of `compiled`, with the median of `(total s, lowering s)` runs."""
    total_s, lower_s = sorted(runs)[(len(runs) - 1) // 2]
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    return Measurement(
        lower_s=lower_s, compile_s=total_s - lower_s, peak_bytes=int(peak),
        temp_bytes=int(memory.temp_size_in_bytes),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        flops=_cost_entry(cost, "flops"), bytes_accessed=_cost_entry(cost, "bytes accessed"))


try:
    import resource  # Unix only
except ImportError:
    resource = None
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if resource is not None else 0


def _usage():
    return resource.getrusage(resource.RUSAGE_SELF) if resource is not None else None


def time_call(fn, args, measured: Measurement | None = None) -> float:
    """Return the wall time of one call, and record its fresh memory and kernel time in `measured`.

    Page faults and system time are counted for the whole process, XLA's threads included.
    """
    before = _usage()
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds = time.perf_counter() - started
    after = _usage()
    if measured is not None and after is not None:
        measured.fresh_bytes.append((after.ru_minflt - before.ru_minflt) * PAGE_BYTES)
        measured.kernel_s.append(after.ru_stime - before.ru_stime)
    return seconds


def run_case(case: Case, probe_counts, options, progress) -> dict:
    """Compile and time every method on `case`.

    Returns `(measurements, profiles)`: name -> Measurement, and, for the methods profiled
    (none unless `options.profile`), name -> ms per category of work (see `hlo_categories`).
    """
    args = (case.params, case.data, jax.random.key(1))
    methods = make_methods(case.loss, probe_counts)
    order_rng = np.random.default_rng(0)
    executables, measurements = compile_methods(case, methods, args, options, order_rng)
    for name, measured in measurements.items():
        progress(f"{case.model} {case.size}: compiled {name} in "
                 f"{measured.compile_total_s:.1f} s, peak {measured.peak_bytes / MIB:.1f} MiB")

    limit = options.max_memory_gib * 2 ** 30
    runnable = []
    for name, measured in measurements.items():
        if measured.peak_bytes > limit:
            measured.skipped = (f"not run: compiled peak {measured.peak_bytes / 2 ** 30:.1f} GiB "
                                f"exceeds --max-memory-gib {options.max_memory_gib:g}")
            continue
        measured.first_call_s = time_call(executables[name], args)
        if measured.first_call_s > options.max_call_seconds:
            measured.times_s = [measured.first_call_s]
            measured.skipped = (f"one call only: {measured.first_call_s:.1f} s exceeds "
                                f"--max-call-seconds {options.max_call_seconds:g}")
            continue
        runnable.append(name)
    progress(f"{case.model} {case.size}: first calls done")

    # Each method gets --min-repeats calls, and more while its timed seconds stay below an
    # equal share of --budget. Cheap methods (value_and_grad, K = 1) so get many more
    # calls than K = 100, and the ratios between them rest on more than three samples.
    share = options.budget / max(len(runnable), 1)
    started = time.perf_counter()
    rounds = 0
    while True:
        active = [name for name in runnable
                  if len(measurements[name].times_s) < options.min_repeats
                  or (sum(measurements[name].times_s) < share
                      and len(measurements[name].times_s) < options.max_repeats)]
        if not active:
            break
        for index in order_rng.permutation(len(active)):
            name = active[index]
            measurements[name].times_s.append(
                time_call(executables[name], args, measurements[name]))
        rounds += 1
    counts = sorted({len(measurements[name].times_s) for name in runnable})
    progress(f"{case.model} {case.size}: {rounds} rounds ({counts[0]} to {counts[-1]} calls "
             f"per method) in {time.perf_counter() - started:.1f} s")

    profiles = {}
    if options.profile:
        # K above 10 is left out: a traced call of K = 100 at 10M parameters takes minutes.
        profiled = [BASELINE, *(method_name("CP", k) for k in probe_counts if k <= 10)]
        for name in profiled:
            if name in runnable:
                profiles[name] = time_by_category(executables[name], args, options.profile)
        progress(f"{case.model} {case.size}: profiled {', '.join(profiles)}")
    return measurements, profiles


# ---------------------------------------------------------------------------------------
# Where the time goes


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_HLO_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_HLO_OP_NAME = re.compile(r'metadata=\{op_name="([^"]*)"')


def hlo_categories(hlo_text: str) -> dict:
    """Map each HLO instruction name to a category of work.

    An instruction that is, or fuses, a `dot` or a `convolution` is "dot" or
    "convolution". Any other is named by the JAX primitive last in its `op_name` metadata
    (for a fusion, its root), or by its HLO opcode where it has no metadata.
    """
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    opcodes = {name: {match.group(2) for line in lines
                      if (match := _HLO_INSTRUCTION.match(line))}
               for name, lines in computations.items()}

    categories = {}
    for lines in computations.values():
        for line in lines:
            match = _HLO_INSTRUCTION.match(line)
            if not match:
                continue
            name, opcode = match.groups()
            called = _HLO_CALLS.search(line)
            kinds = opcodes.get(called.group(1), set()) | {opcode} if called else {opcode}
            if "dot" in kinds:
                categories[name] = "dot"
            elif "convolution" in kinds:
                categories[name] = "convolution"
            else:
                op_name = _HLO_OP_NAME.search(line)
                categories[name] = op_name.group(1).split("/")[-1] if op_name else opcode
    return categories


def time_by_category(executable, args, repeats: int) -> dict:
    """Return category -> ms per call, from a `jax.profiler` trace of `repeats` calls.

    XLA's CPU runtime records one trace event per executed HLO instruction (mostly
    fusions), named like the instruction, and `hlo_categories` groups them.
    """
    categories = hlo_categories(executable.as_text())
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(executable(*args))
        traces = sorted(Path(folder).rglob("perfetto_trace.json.gz"))
        if not traces:
            raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
        with gzip.open(traces[-1]) as trace_file:
            events = json.load(trace_file)["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in categories:
            totals[categories[event["name"]]] += event["dur"] / 1e3 / repeats  # µs to ms
    return dict(totals.most_common())


def format_profile(case_label: str, profiles: dict, top: int = 6) -> str:
    lines = [f"- {case_label}:"]
    for name, totals in profiles.items():
        total = sum(totals.values())
        parts = ", ".join(f"{category} {100 * ms / total:.0f} %"
                          for category, ms in list(totals.items())[:top])
        lines.append(f"  - {name}: {total:.1f} ms of traced ops per call: {parts}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Ratios and tables


def ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def summarize(measurements: dict, probe_counts) -> list:
    """Return one row of ratios per K, CP against value_and_grad and against Hutchinson."""
    base = measurements[BASELINE]
    one_probe = measurements.get(method_name("CP", 1))
    rows = []
    for num_samples in probe_counts:
        cp = measurements[method_name("CP", num_samples)]
        hutchinson = measurements[method_name("Hutchinson", num_samples)]
        extra = math.nan
        if num_samples > 1 and one_probe is not None:
            extra = ratio((cp.median_s - one_probe.median_s) / (num_samples - 1), base.median_s)
        rows.append({
            "K": num_samples,
            "cp_ms": 1e3 * cp.median_s,
            "cp_over_value_and_grad": ratio(cp.median_s, base.median_s),
            "cp_over_hutchinson": ratio(cp.median_s, hutchinson.median_s),
            "extra_probe_over_value_and_grad": extra,
            "cp_compile_s": cp.compile_total_s,
            "cp_compile_over_value_and_grad": ratio(cp.compile_total_s, base.compile_total_s),
            "cp_peak_mib": cp.peak_bytes / MIB,
            "cp_peak_over_value_and_grad": ratio(cp.peak_bytes, base.peak_bytes),
            "cp_flops_over_value_and_grad": ratio(cp.flops, base.flops),
            "cp_temp_mib": cp.temp_bytes / MIB,
            "cp_fresh_mib_per_call": cp.median_fresh_mib,
            "cp_kernel_ms_per_call": cp.median_kernel_ms,
            "hutchinson_ms": 1e3 * hutchinson.median_s,
            "hutchinson_over_value_and_grad": ratio(hutchinson.median_s, base.median_s),
            "hutchinson_compile_over_value_and_grad": ratio(hutchinson.compile_total_s,
                                                            base.compile_total_s),
            "hutchinson_peak_over_value_and_grad": ratio(hutchinson.peak_bytes, base.peak_bytes),
            "hutchinson_flops_over_value_and_grad": ratio(hutchinson.flops, base.flops),
        })
    return rows


def cell(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(header: list, rows: list, text_columns=(0,)) -> str:
    """Return a markdown table, right-aligned but for the columns in `text_columns`."""
    align = ["---" if i in text_columns else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def format_baseline_table(results: list) -> str:
    header = ["model", "size", "parameters", "batch", "value_and_grad ms", "compile s",
              "peak MiB", "GFLOP", "repeats", "load at start"]
    rows = []
    for result in results:
        base = result["measurements"][BASELINE]
        rows.append([result["model"], result["size"], f"{result['num_params']:,}",
                     result["batch"], cell(1e3 * base.median_s), f"{base.compile_total_s:.2f}",
                     f"{base.peak_bytes / MIB:.1f}", f"{base.flops / 1e9:.3f}",
                     len(base.times_s), f"{result['load_at_start']:.2f}"])
    return markdown_table(header, rows, text_columns=(0, 1))


def format_cp_table(results: list) -> str:
    header = ["model", "parameters", "K", "CP ms", "× value_and_grad", "× Hutchinson, same K",
              "extra probe × v&g", "compile × v&g", "peak memory × v&g", "XLA flops × v&g"]
    rows = [[result["model"], f"{result['num_params']:,}", row["K"], cell(row["cp_ms"], 1),
             *(cell(row[key]) for key in (
                 "cp_over_value_and_grad", "cp_over_hutchinson",
                 "extra_probe_over_value_and_grad", "cp_compile_over_value_and_grad",
                 "cp_peak_over_value_and_grad", "cp_flops_over_value_and_grad"))]
            for result in results for row in result["rows"]]
    return markdown_table(header, rows)


def format_fresh_memory_table(results: list) -> str:
    header = ["model", "parameters", "method", "ms per call", "XLA temporaries MiB",
              "fresh memory MiB per call", "kernel CPU ms per call"]
    rows = []
    for result in results:
        base = result["measurements"][BASELINE]
        entries = [(BASELINE, 1e3 * base.median_s, base.temp_bytes / MIB,
                    base.median_fresh_mib, base.median_kernel_ms)]
        entries += [(method_name("CP", row["K"]), row["cp_ms"], row["cp_temp_mib"],
                     row["cp_fresh_mib_per_call"], row["cp_kernel_ms_per_call"])
                    for row in result["rows"]]
        rows += [[result["model"], f"{result['num_params']:,}", name,
                  *(cell(value, 1) for value in values)] for name, *values in entries]
    return markdown_table(header, rows, text_columns=(0, 2))


def format_hutchinson_table(results: list) -> str:
    header = ["model", "parameters", "K", "Hutchinson ms", "× v&g", "compile × v&g",
              "peak memory × v&g", "XLA flops × v&g"]
    rows = [[result["model"], f"{result['num_params']:,}", row["K"],
             cell(row["hutchinson_ms"], 1),
             *(cell(row[key]) for key in (
                 "hutchinson_over_value_and_grad", "hutchinson_compile_over_value_and_grad",
                 "hutchinson_peak_over_value_and_grad", "hutchinson_flops_over_value_and_grad"))]
            for result in results for row in result["rows"]]
    return markdown_table(header, rows)


def check_targets(results: list) -> list:
    """Return one line per target and case: the measured value and whether it holds."""
    checks = []
    for result in results:
        label = f"{result['model']} {result['num_params']:,}"
        for row in result["rows"]:
            k = row["K"]
            if k == 1:
                limit = ONE_PROBE_TARGET[result["model"]]
                checks.append((f"{label}: one probe ≤ {limit}× value_and_grad",
                               row["cp_over_value_and_grad"], limit))
                checks.append((f"{label}: one-probe peak memory ≤ {MEMORY_TARGET}× "
                               "value_and_grad", row["cp_peak_over_value_and_grad"],
                               MEMORY_TARGET))
            else:
                checks.append((f"{label}: extra probe (K={k}) ≤ {EXTRA_PROBE_TARGET}× "
                               "value_and_grad", row["extra_probe_over_value_and_grad"],
                               EXTRA_PROBE_TARGET))
            checks.append((f"{label}: compile (K={k}) ≤ {COMPILE_TARGET}× value_and_grad",
                           row["cp_compile_over_value_and_grad"], COMPILE_TARGET))
    lines = []
    for text, value, limit in checks:
        verdict = "not measured" if not math.isfinite(value) else (
            "holds" if value <= limit else "fails")
        lines.append(f"- {text}: {cell(value)}, {verdict}")
    return lines


# ---------------------------------------------------------------------------------------
# Plot and record


def plot(path: Path, results: list, probe_counts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("cp_over_value_and_grad", "CP time / value_and_grad time"),
              ("cp_over_hutchinson", "CP time / Hutchinson time, same K"),
              ("cp_compile_over_value_and_grad", "CP compile time / value_and_grad's"),
              ("cp_peak_over_value_and_grad", "CP peak memory / value_and_grad's"))
    colors = {"mlp": "tab:blue", "cnn": "tab:orange", "transformer": "tab:green"}
    styles = dict(zip(PROBE_COUNTS, (("o", "-"), ("s", "--"), ("^", ":")), strict=True))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, (field, title) in zip(axes.flat, panels, strict=True):
        for model in MODELS:
            model_results = [r for r in results if r["model"] == model]
            if not model_results:
                continue
            for k in probe_counts:
                points = [(r["num_params"], row[field]) for r in model_results
                          for row in r["rows"] if row["K"] == k and math.isfinite(row[field])]
                if not points:
                    continue
                marker, linestyle = styles.get(k, ("x", "-."))
                xs, ys = zip(*sorted(points), strict=True)
                axis.plot(xs, ys, marker=marker, linestyle=linestyle, color=colors[model],
                          label=f"{model}, K={k}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set_xlabel("parameters")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(probe_counts) * 2, fontsize=8)
    fig.suptitle("cpjax.cp_hessian_diag (separable) under jax.jit, float32, CPU", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_of(result: dict) -> dict:
    record = {key: value for key, value in result.items() if key != "measurements"}
    record["methods"] = {
        name: {**dataclasses.asdict(m), "median_s": m.median_s,
               "compile_total_s": m.compile_total_s}
        for name, m in result["measurements"].items()}
    return record


# ---------------------------------------------------------------------------------------
# Command line


def parse_list(text: str, allowed, convert=str) -> list:
    values = [convert(item) for item in text.split(",") if item]
    unknown = [value for value in values if allowed is not None and value not in allowed]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"invalid or missing values {unknown}; expected "
                                         f"a comma-separated list from {list(allowed)}")
    return values


def parse_probe_counts(text: str) -> list:
    try:
        counts = [int(item) for item in text.split(",") if item]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--probes must be comma-separated integers, got "
                                         f"{text!r}") from err
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--probes must be integers of at least 1, got {text!r}")
    return sorted(set(counts))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda t: parse_list(t, MODELS), default=list(MODELS),
                        help=f"comma-separated models (default {','.join(MODELS)})")
    parser.add_argument("--sizes", type=lambda t: parse_list(t, SIZES), default=list(SIZES),
                        help="comma-separated sizes: small (about 10k parameters), medium "
                             "(0.3M to 0.6M), large (about 10M) (default all)")
    parser.add_argument("--probes", type=parse_probe_counts, default=list(PROBE_COUNTS),
                        help="comma-separated probe counts K (default 1,10,100)")

    parser.add_argument("--skip-largest", action="store_true",
                        help="leave out the largest K at the large size, the slowest cases")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small size only, K=1,10, a 2 s budget per case, "
                             "one compilation per method")

    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed calls per model and size, shared equally among "
                             "the methods (default 20)")
    parser.add_argument("--min-repeats", type=int, default=3,
                        help="timed calls per method at least, whatever the budget (default 3)")
    parser.add_argument("--max-repeats", type=int, default=50,
                        help="timed calls per method at most (default 50)")
    parser.add_argument("--compile-repeats", type=int, default=3,
                        help="lowerings and compilations per method, each from empty JAX "
                             "caches; the median is reported (default 3)")
    parser.add_argument("--compile-in", choices=("children", "process"), default="children",
                        help="where the timed compilations run: in a new Python process per "
                             "method and case (default), or in rounds in this process (faster, "
                             "but later programs compile slower there)")
    parser.add_argument("--compile-child", nargs=3, metavar=("MODEL", "SIZE", "METHOD"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--max-memory-gib", type=float, default=8.0,
                        help="do not run a method whose compiled peak memory exceeds this many "
                             "GiB (default 8)")
    parser.add_argument("--max-call-seconds", type=float, default=15.0,
                        help="time only once a method whose first call takes longer than this "
                             "many seconds (default 15)")

    parser.add_argument("--profile", type=int, default=0, metavar="CALLS",
                        help="after timing, trace this many calls of value_and_grad and of CP "
                             "with each K up to 10 under jax.profiler, and print the op time "
                             "by kind of operation (default 0: off)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder for suite.json and suite.png (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    if args.quick:
        args.sizes = ["small"]
        args.probes = [k for k in args.probes if k <= 10] or [1]
        args.budget = min(args.budget, 2.0)
    if 1 not in args.probes:
        parser.error("--probes must include 1: the extra cost per probe is measured from it")
    if args.profile < 0:
        parser.error(f"--profile must be 0 (off) or a number of calls, got {args.profile}")
    if args.quick:
        args.compile_repeats = 1
        args.compile_in = "process"
    for name in ("min_repeats", "max_repeats", "compile_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, "
                         f"got {getattr(args, name)}")
    if args.max_repeats < args.min_repeats:
        parser.error("--max-repeats must be at least --min-repeats")
    for name in ("budget", "max_memory_gib", "max_call_seconds"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, "
                         f"got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compile_child:
        _run_compile_child(*args.compile_child, args.compile_repeats)
        return
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/suite.py", *argv])
    machine_at_start = describe_machine()
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    results = []
    for model in args.models:
        for size in args.sizes:
            probe_counts = list(args.probes)
            if args.skip_largest and size == SIZES[-1] and len(probe_counts) > 1:
                probe_counts = probe_counts[:-1]
            case = build_case(model, size)
            load_at_start = load_average()
            measurements, profiles = run_case(case, probe_counts, args, progress)
            results.append({
                "model": model, "size": size, "description": case.description,
                "num_params": case.num_params, "batch": case.batch,
                "load_at_start": load_at_start, "load_at_end": load_average(),
                "rows": summarize(measurements, probe_counts), "profile_ms": profiles,
                "measurements": measurements})
    wall_time = time.perf_counter() - started
    machine_at_end = describe_machine()

    print(f"Command: `{command}`\n")
    print("Models (float32, jax.jit, softmax cross-entropy on a fixed random batch):\n")
    for result in results:
        print(f"- {result['model']} {result['size']}: {result['description']}, "
              f"{result['num_params']:,} parameters, batch {result['batch']}")
    print("\nvalue_and_grad, median of interleaved repeats; compile = trace and lower plus XLA "
          "compile; peak = XLA temporaries + arguments + outputs − aliased:\n")
    print(format_baseline_table(results))
    print("\nCP (`cp_hessian_diag`, separable=True), ratios of medians; v&g = value_and_grad; "
          "extra probe = (t_K − t_1) / (K − 1) / t_v&g:\n")
    print(format_cp_table(results))
    print("\nHutchinson (`hutchinson_hessian_diag`), ratios of medians:\n")
    print(format_hutchinson_table(results))
    print("\nFresh memory per call: pages the operating system faulted in during a call, and "
          "the CPU time spent in the kernel (whole process, medians over the timed calls). On "
          "Linux with glibc, XLA temporaries above the mmap threshold are mapped and zeroed "
          "anew on every call:\n")
    print(format_fresh_memory_table(results))
    notes = [f"- {r['model']} {r['size']}, {name}: {m.skipped}" for r in results
             for name, m in r["measurements"].items() if m.skipped]
    if notes:
        print("\nMethods not timed in full:\n")
        print("\n".join(notes))
    if args.profile:
        print(f"\nWhere the time goes: share of the XLA op time traced by jax.profiler over "
              f"{args.profile} calls. Ops that are or fuse a matrix product count as dot or "
              f"convolution, others by the JAX primitive at their root:\n")
        for result in results:
            print(format_profile(f"{result['model']} {result['num_params']:,}",
                                 result["profile_ms"]))
    print("\nTargets:\n")
    print("\n".join(check_targets(results)))
    print(f"\nMachine at start: {machine_at_start}")
    print(f"Machine at end:   {machine_at_end}")
    print(f"cpjax source: {describe_source()}")
    print(f"Total wall time (after Python imports): {wall_time:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "suite.png", results, sorted({k for r in results for k in
                                                  (row["K"] for row in r["rows"])}))
    record = {"command": command, "machine_at_start": machine_at_start,
              "machine_at_end": machine_at_end, "cpjax_source": describe_source(),
              "wall_time_s": wall_time, "cases": [record_of(r) for r in results]}
    (args.out / "suite.json").write_text(json.dumps(finite_or_none(record), indent=2) + "\n")
    print(f"Wrote {args.out / 'suite.png'} and {args.out / 'suite.json'}")


if __name__ == "__main__":
    main()
