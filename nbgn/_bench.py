"""``python -m nbgn bench``: nbgn against the NumPy baseline and PyTorch, side by side on this machine.

Every contender of a case runs round-robin within each repeat (so drift and noisy neighbours hit all
alike) and the table reports medians. Compilation and allocation of inputs happen before timing.
Effective GB/s counts the minimum traffic of a group norm, one read and one write of the array
(``2 * x.nbytes``); the roofline fraction is the time of the cheapest in-place pass over the same
array (Numba's parallel ``x *= a``) divided by the contender's time. The two-pass floor (a sum of
each unit, then ``x *= a`` over it, scheduled as nbgn in place: see ``kernels.roofline``) is nbgn's
memory traffic without its arithmetic: where a unit outgrows the caches, its roofline fraction is
what a group norm that must read each unit before writing it can reach.

Two more measurements answer questions one process's table cannot: ``--scaling`` times nbgn in
place at one thread against all threads, interleaved in one process (how well one unit's work is
split); ``--startup`` times fresh processes with a warm Numba cache, ``import numpy, numba`` against
``import nbgn`` and a first float32 and float64 call (what a short script pays for nbgn).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

import nbgn

from ._info import cpu_model, info
from .kernels.roofline import scale_inplace, two_pass_floor

#: (name, (N, C, *spatial), num_groups): the shapes the README's table and the asv suite use.
DEFAULT_CASES = [
    ("seed", (64, 16, 112, 112), 4),
    ("resnet", (16, 64, 56, 56), 32),
    ("late layers", (16, 2048, 7, 7), 32),
    ("big image", (1, 32, 512, 512), 8),
    ("tiny", (2, 8, 4, 4), 4),
]
QUICK_CASES = [("small", (4, 16, 24, 24), 4), ("tiny", (2, 8, 4, 4), 4)]

#: Each timed measurement runs a contender this long at least (tiny calls are looped).
MIN_MEASUREMENT_SECONDS = 2e-3


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def random_input(
    rng: np.random.Generator, shape: tuple[int, ...], layout: str, dtype: str
) -> np.ndarray:
    """Uniform values in [0, 1) of ``shape`` (N, C, *spatial), created in ``layout``'s order."""
    x = rng.random(shape, dtype=np.float64).astype(dtype)
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if layout == "NHWC" else x


def contenders(x: np.ndarray, groups: int, layout: str) -> dict[str, Callable[[], object]]:
    """Callables to time on ``x``: nbgn in place and allocating, the baseline, PyTorch if
    installed, the roofline pass and the two-pass floor, all with per-channel weight and bias."""
    channels = x.shape[1] if layout == "NCHW" else x.shape[-1]
    weight = np.linspace(0.5, 1.5, channels).astype(x.dtype)
    bias = np.linspace(-1.0, 1.0, channels).astype(x.dtype)
    work = x.copy()
    contenders: dict[str, Callable[[], object]] = {
        "nbgn in place": lambda: nbgn.group_norm(
            work, groups, weight, bias, layout=layout, out=work
        ),
        "nbgn allocating": lambda: nbgn.group_norm(x, groups, weight, bias, layout=layout),
        "numpy baseline": lambda: nbgn.baseline.group_norm(x, groups, weight, bias, layout=layout),
    }
    torch = _torch()
    if torch is not None:
        tensor = torch.from_numpy(x)
        if layout == "NHWC":  # the same memory, seen as a channels_last NCHW tensor
            tensor = tensor.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        t_weight, t_bias = torch.from_numpy(weight), torch.from_numpy(bias)
        contenders["pytorch"] = lambda: torch.nn.functional.group_norm(
            tensor, groups, t_weight, t_bias
        )
    # Over the same array as nbgn in place (``work``), as the roofline's definition says; a factor
    # of 1 leaves it as it is.
    contenders["roofline x *= a"] = lambda: scale_inplace(work, 1.0)
    # The units whose every value must be read before any is written: an NCHW group of a sample,
    # an NHWC sample (its groups interleave along the channels).
    units = x.shape[0] * groups if layout == "NCHW" else x.shape[0]
    contenders["two-pass floor"] = lambda: two_pass_floor(work, units, 1.0)
    return contenders


#: Untimed calls of a contender before each of its timed measurements last this long at least (ten
#: calls of 200 us; one of a contender slower than that). One call is not enough on a 2-core VM: after 20 PyTorch calls, nbgn's next eight (16, 2048, 7,
#: 7)/32 allocating calls took 245, 191, 147, 129, 122, 122, 119 and 118 us (medians of 15), against
#: 113-116 us after its own; PyTorch's after nbgn's 233, 203, 193, 187 against 179 us.
WARM_UP_SECONDS = 2e-3


def _warm_up(run: Callable[[], object], seconds: float) -> None:
    """Call ``run`` for at least ``seconds`` (once at least), untimed."""
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < seconds:
        run()


#: Bytes read to evict the caches before a cold measurement: twice the largest last-level cache
#: we expect (the one here is 32 MiB).
FLUSH_BYTES = 256 * 2**20


def time_side_by_side(
    contenders: dict[str, Callable[[], object]], repeat: int, cold: bool = False
) -> dict[str, float]:
    """Median seconds per call of each contender over ``sample_side_by_side``'s repeats."""
    samples = sample_side_by_side(contenders, repeat, cold)
    return {name: statistics.median(values) for name, values in samples.items()}


def sample_side_by_side(
    contenders: dict[Any, Callable[[], object]],
    repeat: int,
    cold: bool = False,
    prepare: Callable[[Any], object] | None = None,
) -> dict[Any, list[float]]:
    """Seconds per call of each contender, one sample per repeat, timed round-robin ``repeat``
    times (sample ``k`` of every contender comes from repeat ``k``: see ``paired_ratio``).
    ``prepare(name)``, if given, sets the machine up for a contender (a thread count, say) before
    any call of it, untimed. The first contender's time sets how many calls a sample takes.

    By default each timed sample follows untimed calls of the same contender (``_warm_up``), so
    every contender is measured in its own steady state (its data as warm as its previous call left
    it, its threads awake), not in the state the contender before it left the machine in; and each
    repeat starts one contender further on, so that none always follows the same one. With
    ``cold``, the caches are flushed before every single timed call instead: every contender
    starts from memory.
    """
    names = list(contenders)
    set_up = prepare or (lambda name: None)
    for name in names:
        set_up(name)
        contenders[name]()  # compile and warm up
    flush = np.ones(FLUSH_BYTES // 8) if cold else None
    set_up(names[0])
    sizing = contenders[names[0]]
    _warm_up(sizing, WARM_UP_SECONDS)
    start = time.perf_counter()
    sizing()
    single = max(time.perf_counter() - start, 1e-7)
    number = 1 if cold else max(1, math.ceil(MIN_MEASUREMENT_SECONDS / single))
    samples: dict[Any, list[float]] = {name: [] for name in names}
    for repeat_index in range(repeat):
        shift = repeat_index % len(names)
        for name in names[shift:] + names[:shift]:
            set_up(name)
            run = contenders[name]
            if flush is None:
                _warm_up(run, WARM_UP_SECONDS)
            else:
                # A parallel pass, so that the threads are awake, not waiting to be woken.
                scale_inplace(flush, 1.0)
            start = time.perf_counter()
            for _ in range(number):
                run()
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def paired_ratio(samples: dict[Any, list[float]], numerator: Any, denominator: Any) -> float:
    """The median over repeats of ``numerator``'s time over ``denominator``'s in the same repeat.

    The two samples of a repeat are taken within milliseconds of each other, so a slow spell of a
    shared machine (another tenant's burst) weighs on both; a ratio of the two medians pairs
    samples from different moments. On a noisy 2-core VM, (16, 2048, 7, 7)/32 PyTorch against nbgn
    allocating gave medians whose ratio moved from 1.36 to 1.95 between runs.
    """
    return statistics.median(
        a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)
    )


#: The thread-scaling case: one sample, one group, cache-resident (2 MiB in float32), so that
#: all threads share one unit's work.
SCALING_CASES = [("one group", (1, 8, 256, 256), 1)]


def sample_thread_scaling(
    run: Callable[[], object], thread_counts: Sequence[int], repeat: int
) -> dict[int, list[float]]:
    """Seconds per call of ``run`` at each of ``thread_counts``, one sample per repeat:
    ``sample_side_by_side`` with the counts for contenders, each set by ``numba.set_num_threads``
    before its calls (the caller's count restored after)."""
    previous = numba.get_num_threads()
    try:
        return sample_side_by_side(
            {count: run for count in thread_counts}, repeat, prepare=numba.set_num_threads
        )
    finally:
        numba.set_num_threads(previous)


def run_scaling(
    cases: Sequence[tuple[str, tuple[int, ...], int]] = SCALING_CASES,
    layouts: Sequence[str] = ("NCHW", "NHWC"),
    dtypes: Sequence[str] = ("float32",),
    threads: int | None = None,
    repeat: int = 15,
) -> dict[str, Any]:
    """nbgn in place (with weight and bias) at one thread against ``threads`` (default: all
    Numba may use) on every case; return ``{"machine": ..., "scaling": [...]}``, a row per case
    with both medians and ``speedup`` (one thread's time / all threads', ``paired_ratio``)."""
    many = threads or numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(0)
    rows = []
    for name, shape, groups in cases:
        for layout in layouts:
            for dtype in dtypes:
                x = random_input(rng, shape, layout, dtype)
                samples = sample_thread_scaling(contenders(x, groups, layout)["nbgn in place"],
                                                [1, many], repeat)  # fmt: skip
                rows.append({"case": name, "shape": list(shape), "groups": groups,
                             "layout": layout, "dtype": dtype, "threads": many,
                             "seconds_one_thread": statistics.median(samples[1]),
                             "seconds_all_threads": statistics.median(samples[many]),
                             "speedup": paired_ratio(samples, 1, many)})  # fmt: skip
    return {"machine": machine(), "repeat": repeat, "scaling": rows}


#: What the fresh processes of ``--startup`` run, each timing its parts inside itself and printing
#: the seconds: the baseline's imports, and nbgn's import with its first float32 and float64 calls.
STARTUP_BASELINE = """\
import time
start = time.perf_counter()
import numpy, numba
print(time.perf_counter() - start)
"""
STARTUP_NBGN = """\
import time
start = time.perf_counter()
import numpy, numba
imported_numba = time.perf_counter()
import nbgn
imported_nbgn = time.perf_counter()
x = numpy.ones((2, 8, 4, 4), numpy.float32)
nbgn.group_norm(x, 4)
first_float32 = time.perf_counter()
nbgn.group_norm(x.astype(numpy.float64), 4)
first_float64 = time.perf_counter()
print(imported_numba - start, imported_nbgn - imported_numba, first_float32 - imported_nbgn,
      first_float64 - first_float32)
"""
STARTUP_PARTS = ("import numpy, numba", "import nbgn", "first float32 call", "first float64 call")


def _fresh_process(code: str) -> tuple[float, list[float]]:
    """Wall seconds of a fresh ``python -c code``, its start and exit included, and the seconds
    it printed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"a fresh Python process ({sys.executable}) failed to run the startup measurement; "
            f"it printed:\n{done.stderr.strip()}"
        )
    return seconds, [float(value) for value in done.stdout.split()]


def time_startup(repeat: int = 7) -> dict[str, Any]:
    """``STARTUP_BASELINE`` against ``STARTUP_NBGN`` in ``repeat`` pairs of fresh processes
    (alternating which runs first), after one untimed run of each (which fills Numba's cache if it
    was cold, and the OS's file cache).

    Returns medians: ``in_process`` (the baseline's imports against nbgn's process's parts added
    up, each timed inside its process: what importing nbgn and its first calls take),
    ``whole_process`` (wall times of the processes, interpreter start and exit included) and
    ``parts``; each with its ``ratio``, the median of the pairs' ratios.
    """
    _fresh_process(STARTUP_BASELINE)
    _fresh_process(STARTUP_NBGN)
    samples: dict[str, list[float]] = {
        key: [] for key in ("baseline", "nbgn", "baseline_wall", "nbgn_wall", *STARTUP_PARTS)
    }
    for repeat_index in range(repeat):
        first, second = (STARTUP_BASELINE, STARTUP_NBGN)
        order = (first, second) if repeat_index % 2 == 0 else (second, first)
        timed = {code: _fresh_process(code) for code in order}
        baseline_wall, (baseline,) = timed[STARTUP_BASELINE]
        nbgn_wall, parts = timed[STARTUP_NBGN]
        for key, value in zip(STARTUP_PARTS, parts, strict=True):
            samples[key].append(value)
        samples["baseline"].append(baseline)
        samples["nbgn"].append(sum(parts))
        samples["baseline_wall"].append(baseline_wall)
        samples["nbgn_wall"].append(nbgn_wall)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {
        "machine": machine(),
        "repeat": repeat,
        "startup": {
            "in_process": {"baseline_seconds": medians["baseline"],
                           "nbgn_seconds": medians["nbgn"],
                           "ratio": paired_ratio(samples, "nbgn", "baseline")},
            "whole_process": {"baseline_seconds": medians["baseline_wall"],
                              "nbgn_seconds": medians["nbgn_wall"],
                              "ratio": paired_ratio(samples, "nbgn_wall", "baseline_wall")},
            "parts": {key: medians[key] for key in STARTUP_PARTS},
        },
    }  # fmt: skip


def machine() -> dict[str, Any]:
    """The header of a benchmark: CPU, cores, threading layer and threads, versions."""
    details = info()
    return {
        "cpu": cpu_model(),
        "cores": details["cpu_count"],
        "vector_features": details["vector_features"],
        "threading_layer": details["threading"]["active"] or details["threading"]["configured"],
        "threads": numba.get_num_threads(),
        "versions": {k: details[k] for k in ("nbgn", "python", "numpy", "numba", "tbb", "torch")},
    }


def run(
    cases: Sequence[tuple[str, tuple[int, ...], int]] = DEFAULT_CASES,
    layouts: Sequence[str] = ("NCHW", "NHWC"),
    dtypes: Sequence[str] = ("float32",),
    threads: int | None = None,
    repeat: int = 15,
    progress: Callable[[str], None] | None = None,
    cold: bool = False,
) -> dict[str, Any]:
    """Time every contender on every case; return ``{"machine": ..., "results": [...]}``.

    ``cases`` are ``(name, (N, C, *spatial), num_groups)``; for NHWC the array is created
    channels last. Each result row: case, shape, groups, layout, dtype, threads, contender,
    ``seconds`` (median), ``vs_nbgn_in_place`` (time ratio), ``gb_per_s``, ``roofline`` and
    ``vs_pytorch`` (PyTorch's time / the contender's; None without PyTorch); the ratios are
    medians of ratios within a repeat (``paired_ratio``).
    ``cold``: caches flushed before every timed call (see ``time_side_by_side``).
    """
    torch = _torch()
    previous = numba.get_num_threads(), None if torch is None else torch.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    try:
        rows = _run_cases(cases, layouts, dtypes, repeat, progress, cold)
        return {"machine": machine(), "repeat": repeat, "cold": cold, "results": rows}
    finally:
        numba.set_num_threads(previous[0])
        if torch is not None:
            torch.set_num_threads(previous[1])


def _run_cases(cases, layouts, dtypes, repeat, progress, cold):
    rng = np.random.default_rng(0)
    rows = []
    total = len(cases) * len(layouts) * len(dtypes)
    step = 0
    for name, shape, groups in cases:
        for layout in layouts:
            for dtype in dtypes:
                step += 1
                if progress is not None:
                    progress(f"[{step}/{total}] {name} {shape}/{groups} {layout} {dtype}")
                x = random_input(rng, shape, layout, dtype)
                samples = sample_side_by_side(contenders(x, groups, layout), repeat, cold)
                rows.extend(
                    {
                        "case": name,
                        "shape": list(shape),
                        "groups": groups,
                        "layout": layout,
                        "dtype": dtype,
                        "threads": numba.get_num_threads(),
                        "contender": contender,
                        "seconds": seconds,
                        "vs_nbgn_in_place": paired_ratio(samples, contender, "nbgn in place"),
                        "gb_per_s": 2 * x.nbytes / seconds / 1e9,
                        "roofline": paired_ratio(samples, "roofline x *= a", contender),
                        "vs_pytorch": (
                            paired_ratio(samples, "pytorch", contender)
                            if "pytorch" in samples
                            else None
                        ),
                    }
                    for contender, seconds in (
                        (name, statistics.median(values)) for name, values in samples.items()
                    )
                )
    return rows


def _format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:7.2f} {unit}"
    return f"{seconds * 1e9:7.1f} ns"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: a machine header, then one block of rows per case."""
    lines = [
        *_machine_lines(report["machine"]),
        f"Medians of {report['repeat']} interleaved repeats, "
        + ("caches flushed before every call" if report.get("cold") else "each in steady state")
        + "; ratio = time / nbgn in place, roofline = time of x *= a / time and vs torch = "
        "PyTorch's time / time, each the median of the ratios within a repeat; GB/s = 2 * nbytes "
        "/ median time; two-pass floor = each unit summed, then x *= a",
        "",
        f"{'case':<28} {'layout':<5} {'dtype':<8} {'contender':<16} {'median':>10} "
        f"{'ratio':>7} {'GB/s':>7} {'roofline':>8} {'vs torch':>8}",
    ]
    previous = None
    for row in report["results"]:
        key = (row["case"], row["layout"], row["dtype"])
        if key != previous and previous is not None:
            lines.append("")
        label = f"{row['case']} {tuple(row['shape'])}/{row['groups']}" if key != previous else ""
        layout, dtype = (row["layout"], row["dtype"]) if key != previous else ("", "")
        previous = key
        lines.append(
            f"{label:<28} {layout:<5} {dtype:<8} {row['contender']:<16} "
            f"{_format_seconds(row['seconds']):>10} {row['vs_nbgn_in_place']:7.2f} "
            f"{row['gb_per_s']:7.1f} {row['roofline']:8.2f}"
            + ("" if row.get("vs_pytorch") is None else f" {row['vs_pytorch']:8.2f}")
        )
    return "\n".join(lines)


def _machine_lines(m: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return [
        f"CPU: {m['cpu']}, {m['cores']} cores ({' '.join(m['vector_features'])})",
        f"Numba threading layer: {m['threading_layer']}, threads: {m['threads']}",
        f"Versions: {versions}",
    ]


def format_scaling(report: dict[str, Any]) -> str:
    """``run_scaling``'s report as text: a row per case, layout and dtype."""
    lines = [
        *_machine_lines(report["machine"]),
        f"nbgn in place with weight and bias; medians of {report['repeat']} interleaved repeats",
        "",
        f"{'case':<28} {'layout':<6} {'dtype':<8} {'1 thread':>10} {'threads':>8} "
        f"{'median':>10} {'speedup':>8}",
    ]
    for row in report["scaling"]:
        label = f"{row['case']} {tuple(row['shape'])}/{row['groups']}"
        lines.append(
            f"{label:<28} {row['layout']:<6} {row['dtype']:<8} "
            f"{_format_seconds(row['seconds_one_thread']):>10} {row['threads']:>8} "
            f"{_format_seconds(row['seconds_all_threads']):>10} {row['speedup']:8.2f}"
        )
    return "\n".join(lines)


def format_startup(report: dict[str, Any]) -> str:
    """``time_startup``'s report as text."""
    startup = report["startup"]
    lines = [
        *_machine_lines(report["machine"]),
        f"Fresh processes, warm Numba cache; medians of {report['repeat']} alternating pairs",
        "",
        f"{'':<44} {'import numpy, numba':>20} {'import nbgn + calls':>20} {'ratio':>6}",
    ]
    for key, label in (("in_process", "timed inside the processes"),
                       ("whole_process", "whole processes (start and exit too)")):  # fmt: skip
        row = startup[key]
        lines.append(f"{label:<44} {_format_seconds(row['baseline_seconds']):>20} "
                     f"{_format_seconds(row['nbgn_seconds']):>20} {row['ratio']:6.2f}")  # fmt: skip
    lines += ["", "nbgn's process, part by part:"]
    lines += [f"  {name:<42} {_format_seconds(seconds):>10}"
              for name, seconds in startup["parts"].items()]  # fmt: skip
    return "\n".join(lines)


def _progress(message: str) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(f"{message:<70}", end=end, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbgn bench",
        description="nbgn in place and allocating, the NumPy baseline and PyTorch (if installed), "
        "timed side by side on this machine.",
    )
    parser.add_argument(
        "--shape", type=int, nargs="+", action="append", metavar="DIM",
        help="N C *spatial (repeatable; default: seed, resnet, late layers, big image, tiny)",
    )  # fmt: skip
    parser.add_argument("--groups", type=int, nargs="+", help="num_groups, one per --shape")
    parser.add_argument("--layout", nargs="+", choices=["NCHW", "NHWC"], default=["NCHW", "NHWC"])
    parser.add_argument("--dtype", nargs="+", choices=["float32", "float64"], default=["float32"])
    parser.add_argument("--threads", type=int, help="numba.set_num_threads (and PyTorch's)")
    parser.add_argument("--repeat", type=int, default=15, help="interleaved repeats (median)")
    parser.add_argument("--quick", action="store_true", help="two small shapes, 3 repeats")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="flush the caches before every timed call (default: each contender's steady state)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--scaling", action="store_true",
        help="nbgn in place at 1 thread against all (or --threads); default case (1, 8, 256, 256)/1",
    )  # fmt: skip
    mode.add_argument(
        "--startup", action="store_true",
        help="fresh processes: import numpy, numba against import nbgn and first calls",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.startup and (args.shape or args.groups or args.threads or args.quick or args.cold):
        parser.error("--startup times its own fixed calls: it takes only --repeat and --json")
    if args.scaling and (args.quick or args.cold):
        parser.error("--scaling measures steady states: --quick and --cold apply to the table")
    if args.startup:
        report = time_startup(7 if args.repeat == 15 else args.repeat)
        print(json.dumps(report, indent=2) if args.json else format_startup(report))
        return 0

    if args.shape:
        groups = args.groups or [1] * len(args.shape)
        if len(groups) != len(args.shape):
            parser.error("give one --groups value per --shape")
        cases = [
            (f"shape {i + 1}", tuple(s), g)
            for i, (s, g) in enumerate(zip(args.shape, groups, strict=True))
        ]
    else:
        cases = SCALING_CASES if args.scaling else QUICK_CASES if args.quick else DEFAULT_CASES
    repeat = 3 if args.quick and args.repeat == 15 else args.repeat
    if args.scaling:
        report = run_scaling(cases, args.layout, args.dtype, args.threads, repeat)
        print(json.dumps(report, indent=2) if args.json else format_scaling(report))
        return 0
    report = run(
        cases, args.layout, args.dtype, args.threads, repeat, progress=_progress, cold=args.cold
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
