"""Figures to track over commits: speedup over the baseline, fraction of the memory roofline, and of
the two-pass floor (the least an exact group norm can take: see ``nbgn.kernels.roofline``)."""

import numba
import numpy as np

# The module, not its functions: asv would take an imported ``time_side_by_side`` for a benchmark.
from nbgn import _bench

from .common import CASES, DTYPES, LAYOUTS, make_input


class GroupNormFigures:
    """Both measured side by side in one process, all threads: medians of the ratios within each of
    the interleaved repeats (``_bench.paired_ratio``)."""

    params = [list(CASES), LAYOUTS, DTYPES]
    param_names = ["case", "layout", "dtype"]
    timeout = 600

    def setup(self, case, layout, dtype):
        x, groups, _, _ = make_input(case, layout, dtype)
        self.samples = _bench.sample_side_by_side(_bench.contenders(x, groups, layout), repeat=7)

    def track_speedup_over_baseline(self, case, layout, dtype):
        return _bench.paired_ratio(self.samples, "numpy baseline", "nbgn in place")

    track_speedup_over_baseline.unit = "x (baseline time / nbgn in-place time)"

    def track_roofline_fraction(self, case, layout, dtype):
        return _bench.paired_ratio(self.samples, "roofline x *= a", "nbgn in place")

    track_roofline_fraction.unit = "fraction (x *= a time / nbgn in-place time)"

    def track_two_pass_floor_fraction(self, case, layout, dtype):
        return _bench.paired_ratio(self.samples, "two-pass floor", "nbgn in place")

    track_two_pass_floor_fraction.unit = "fraction (two-pass floor time / nbgn in-place time)"


class ThreadScaling:
    """nbgn in place at one thread against all, in one process (median of the ratios within each
    interleaved repeat), on
    one sample of one group (``_bench.SCALING_CASES``): the threads must split one unit's work."""

    params = [LAYOUTS, DTYPES]
    param_names = ["layout", "dtype"]
    timeout = 300

    def setup(self, layout, dtype):
        ((_, shape, groups),) = _bench.SCALING_CASES
        x = _bench.random_input(np.random.default_rng(0), shape, layout, dtype)
        self.all_threads = numba.config.NUMBA_NUM_THREADS
        run = _bench.contenders(x, groups, layout)["nbgn in place"]
        self.samples = _bench.sample_thread_scaling(run, [1, self.all_threads], repeat=7)

    def track_speedup_of_all_threads(self, layout, dtype):
        return _bench.paired_ratio(self.samples, 1, self.all_threads)

    track_speedup_of_all_threads.unit = "x (one thread's time / all threads' time)"


class WarmStart:
    """A fresh process with a warm Numba cache: ``import nbgn`` and a first float32 and float64
    call against ``import numpy, numba`` alone, in alternating pairs of fresh processes
    (``_bench.time_startup``; its first, untimed, run fills a cold cache). ``in_process``: what
    those statements take, timed inside each process; ``whole_process``: the processes' wall
    times, interpreter start and exit included."""

    params = [["in_process", "whole_process"]]
    param_names = ["timed"]
    timeout = 600

    def setup(self, timed):
        self.startup = _bench.time_startup(repeat=5)["startup"]

    def track_warm_start_ratio(self, timed):
        return self.startup[timed]["ratio"]

    track_warm_start_ratio.unit = "x (nbgn's import and first calls / import numpy, numba)"
