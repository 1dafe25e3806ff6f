"""Compile nbgn's hot loops and print, as JSON, how many packed (ymm/zmm) arithmetic instructions
each one's machine code has: ``{"kernel [dtype, variant]": count}``.

Run by ``test_vectorization.py`` in a fresh ``NUMBA_CACHE_DIR``: code loaded from Numba's cache
cannot be inspected. The kernels are called directly on small arrays, so that each is compiled
on its own and its assembly is its hot loops plus their setup.
"""

import json
import re

import numpy as np

from nbgn.kernels import moments, nchw, nhwc, simd

# Nothing streams: the streamed stores are explicit vectors of LLVM IR (simd), which would count
# toward the out-of-place kernels' packed instructions; this probe checks what LLVM vectorizes.
simd._host_stream_bytes = lambda: None

#: Packed floating-point arithmetic on 256- or 512-bit registers: vfmadd231ps %zmm..., vaddpd ...
PACKED = re.compile(r"\bv(?:fn?m(?:add|sub)\d*|add|sub|mul)p[sd]\s[^\n]*%[yz]mm")


def packed_count(dispatcher):
    """Packed instructions in the assembly of ``dispatcher``'s last compiled signature."""
    return len(PACKED.findall(dispatcher.inspect_asm(dispatcher.signatures[-1])))


def main():
    counts = {}
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        zero = dtype(0)
        # NCHW: 4 samples x 2 groups of 4 channels of 64 values (fused), 8 channels of 49
        # (patterned), 4 of 4 (short slabs).
        x = rng.standard_normal(4 * 8 * 64).astype(dtype)
        weight = rng.standard_normal(8).astype(dtype)
        bias = rng.standard_normal(8).astype(dtype)
        for variant, out in (("in place", None), ("out", np.empty_like(x))):
            nchw.normalize_slabs(x.copy(), out, 0, 8, 8, 64, 2, weight, bias, 1e-5, zero)
            counts[f"nchw.normalize_slabs [{name}, {variant}]"] = packed_count(nchw.normalize_slabs)
            nchw.normalize_short_slabs(x.copy(), out, 0, 64, 8, 4, 2, weight, bias, 1e-5)
            counts[f"nchw.normalize_short_slabs [{name}, {variant}]"] = packed_count(
                nchw.normalize_short_slabs
            )
        patterned = rng.standard_normal(2 * 16 * 49).astype(dtype)
        weight16 = rng.standard_normal(16).astype(dtype)
        bias16 = rng.standard_normal(16).astype(dtype)
        for variant, out in (("in place", None), ("out", np.empty_like(patterned))):
            nchw.normalize_slabs_patterned(patterned.copy(), out, 0, 4, 2, 16, 49, 2, weight16,
                                           bias16, 1e-5, zero)  # fmt: skip
            counts[f"nchw.normalize_slabs_patterned [{name}, {variant}]"] = packed_count(
                nchw.normalize_slabs_patterned
            )
            counts[f"nchw.normalize_pair_against [{name}, {variant}]"] = packed_count(
                nchw.normalize_pair_against
            )
        # The channel windows: 16 channels of 49 values (float32 one window with AVX-512,
        # float64 two); a host without permutes for a dtype has no window kernel for it.
        lanes = simd.host_window_widths(np.dtype(dtype).itemsize)[0]
        if lanes:
            table = simd.window_table(49, lanes)
            for variant, out in (("in place", None), ("out", np.empty_like(patterned))):
                nchw.normalize_windows(patterned.copy(), out, 0, 16, 49, 0.5, 0.0, 2.0, weight16,
                                       bias16, 0, table, lanes)  # fmt: skip
                counts[f"nchw.normalize_windows [{name}, {variant}]"] = packed_count(
                    nchw.normalize_windows
                )
        nchw.normalize_rows(x.copy(), None, 0, 64, 0, 8, 0.5, 0.0, 2.0, weight, bias,
                            np.empty((8, 3), dtype))  # fmt: skip
        counts[f"nchw.normalize_rows [{name}, in place]"] = packed_count(nchw.normalize_rows)
        moments.shifted_sums(x, zero)
        counts[f"moments.shifted_sums [{name}]"] = packed_count(moments.shifted_sums)
        moments.shifted_sums(x, 0.0)
        counts[f"moments.shifted_sums [{name} values, float64 sums]"] = packed_count(
            moments.shifted_sums
        )

        # NHWC: 64 positions x 16 channels (lanes), 16 positions x 8 channels (small samples).
        lanes = np.zeros((3, 256), dtype)
        nhwc.lane_sums(x, 0, 256, 512, 2, lanes, 0)
        counts[f"nhwc.lane_sums [{name}, four streams]"] = packed_count(nhwc.lane_sums)
        nhwc.register_lane_sums(x, 0, 4, 2, lanes)
        counts[f"nhwc.register_lane_sums [{name}]"] = packed_count(nhwc.register_lane_sums)
        nhwc.register_folded_sums(x, 0, 512, 2, 256, 1, lanes)
        counts[f"nhwc.register_folded_sums [{name}]"] = packed_count(nhwc.register_folded_sums)
        coefficients = np.ones((3, 16), dtype)
        lane_space = moments.aligned_full(3 * 256, zero)
        small = rng.standard_normal(4 * 16 * 8).astype(dtype)
        for variant, out in (("in place", None), ("out", np.empty_like(x))):
            nhwc.apply_positions(x.copy(), out, 0, 0, 128, 16, 4, coefficients, lane_space)
            counts[f"nhwc.apply_positions [{name}, {variant}]"] = packed_count(nhwc.apply_positions)
            small_out = None if out is None else np.empty_like(small)
            nhwc.normalize_small_samples(small.copy(), small_out, 0, 4, 16, 8, 2, weight, bias,
                                         1e-5)  # fmt: skip
            counts[f"nhwc.normalize_small_samples [{name}, {variant}]"] = packed_count(
                nhwc.normalize_small_samples
            )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
