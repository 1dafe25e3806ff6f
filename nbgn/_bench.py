"""``python -m nbgn bench``: nbgn against the NumPy baseline and PyTorch, side by side on this machine.

Every contender of a case runs round-robin within each repeat (so drift and noisy neighbours hit all
alike) and the table reports medians. Compilation and allocation of inputs happen before timing.
Effective GB/s counts the minimum traffic of a group norm, one read and one write of the array
(``2 * x.nbytes``); the roofline fraction is the time of the cheapest in-place pass over the same
array (Numba's parallel ``x *= a``) divided by the contender's time. The two-pass floor (a sum of
each unit, then ``x *= a`` over it, scheduled as nbgn in place: see ``kernels.roofline``) is nbgn's
memory traffic without its arithmetic: where a unit outgrows the caches, its roofline fraction is
what a group norm that must read each unit before writing it can reach.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
    """Median seconds per call of each contender, timed round-robin ``repeat`` times.

    By default each timed sample follows untimed calls of the same contender (``_warm_up``), so
    every contender is measured in its own steady state (its data as warm as its previous call left
    it, its threads awake), not in the state the contender before it left the machine in; and each
    repeat starts one contender further on, so that none always follows the same one. With
    ``cold``, the caches are flushed before every single timed call instead: every contender
    starts from memory.
    """
    for run in contenders.values():
        run()  # compile and warm up
    flush = np.ones(FLUSH_BYTES // 8) if cold else None
    sizing = contenders["nbgn in place"]
    _warm_up(sizing, WARM_UP_SECONDS)
    start = time.perf_counter()
    sizing()
    single = max(time.perf_counter() - start, 1e-7)
    number = 1 if cold else max(1, math.ceil(MIN_MEASUREMENT_SECONDS / single))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for repeat_index in range(repeat):
        shift = repeat_index % len(names)
        for name in names[shift:] + names[:shift]:
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
    return {name: statistics.median(values) for name, values in samples.items()}


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
    ``seconds`` (median), ``vs_nbgn_in_place`` (time ratio), ``gb_per_s`` and ``roofline``.
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
                x = rng.random(shape, dtype=np.float64).astype(dtype)
                if layout == "NHWC":
                    x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
                medians = time_side_by_side(contenders(x, groups, layout), repeat, cold)
                reference = medians["nbgn in place"]
                roofline = medians["roofline x *= a"]
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
                        "vs_nbgn_in_place": seconds / reference,
                        "gb_per_s": 2 * x.nbytes / seconds / 1e9,
                        "roofline": roofline / seconds,
                    }
                    for contender, seconds in medians.items()
                )
    return rows


def _format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:7.2f} {unit}"
    return f"{seconds * 1e9:7.1f} ns"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: a machine header, then one block of rows per case."""
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"CPU: {m['cpu']}, {m['cores']} cores ({' '.join(m['vector_features'])})",
        f"Numba threading layer: {m['threading_layer']}, threads: {m['threads']}",
        f"Versions: {versions}",
        f"Medians of {report['repeat']} interleaved repeats, "
        + ("caches flushed before every call" if report.get("cold") else "each in steady state")
        + "; ratio = time / nbgn in place; GB/s = 2 * nbytes / time; "
        "roofline = time of x *= a / time; two-pass floor = each unit summed, then x *= a",
        "",
        f"{'case':<28} {'layout':<5} {'dtype':<8} {'contender':<16} {'median':>10} "
        f"{'ratio':>7} {'GB/s':>7} {'roofline':>8}",
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
        )
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
    args = parser.parse_args(argv)

    if args.shape:
        groups = args.groups or [1] * len(args.shape)
        if len(groups) != len(args.shape):
            parser.error("give one --groups value per --shape")
        cases = [
            (f"shape {i + 1}", tuple(s), g)
            for i, (s, g) in enumerate(zip(args.shape, groups, strict=True))
        ]
    else:
        cases = QUICK_CASES if args.quick else DEFAULT_CASES
    repeat = 3 if args.quick and args.repeat == 15 else args.repeat
    report = run(
        cases, args.layout, args.dtype, args.threads, repeat, progress=_progress, cold=args.cold
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
