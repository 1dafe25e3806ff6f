"""Shapes, inputs and thread settings shared by the benchmark classes."""

import numba
import numpy as np

#: name: ((N, C, *spatial), num_groups)
CASES = {
    "seed": ((64, 16, 112, 112), 4),
    "resnet": ((16, 64, 56, 56), 32),
    "late_layers": ((16, 2048, 7, 7), 32),
    # Input and output together past the L3 (51 MB in float32): NHWC rows stream past the caches
    # (simd.streams); NCHW channels of 49 values are too short to, and go through the caches.
    "late_layers_batch64": ((64, 2048, 7, 7), 32),
    "big_image": ((1, 32, 512, 512), 8),
    # One image at inference: an NHWC sample (784 KiB in float32) is a single unit, which the
    # threads normalize together.
    "one_image": ((1, 64, 56, 56), 32),
    "tiny": ((2, 8, 4, 4), 4),
}
LAYOUTS = ["NCHW", "NHWC"]
DTYPES = ["float32", "float64"]
THREADS = ["1", "all"]


def make_input(case, layout, dtype):
    """A random array for ``case`` in ``layout``, with per-channel weight and bias.

    Drawn directly in its dtype and memory order: a ``peakmem_`` figure is the peak of the whole
    process, setup included, so a temporary larger than ``x`` here would hide what the call adds.
    """
    shape, groups = CASES[case]
    in_layout = shape if layout == "NCHW" else (shape[0], *shape[2:], shape[1])
    x = np.random.default_rng(0).random(in_layout, dtype=np.dtype(dtype).type)
    weight = np.linspace(0.5, 1.5, shape[1]).astype(dtype)
    bias = np.linspace(-1.0, 1.0, shape[1]).astype(dtype)
    return x, groups, weight, bias


def set_threads(threads):
    """``numba.set_num_threads`` for "1" or "all"; returns the previous count to restore."""
    previous = numba.get_num_threads()
    numba.set_num_threads(1 if threads == "1" else numba.config.NUMBA_NUM_THREADS)
    return previous
