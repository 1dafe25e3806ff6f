"""``python -m nbgn``: the seed walkthrough as a demo; ``bench`` and ``info`` subcommands.

With no arguments it retells the walkthrough on its default tensor, a random ``(64, 16, 112, 112)``
array with 4 groups: statistics before and after, then the time of nbgn in place next to the NumPy
baseline (and PyTorch when installed), measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

import nbgn


def print_stats(label: str, tensor: np.ndarray) -> None:
    """The walkthrough's ``get_stats``: type, shape, mean, standard deviation, min and max."""
    print(f"{label}:")
    print(f"  Object Type:        {type(tensor)} ({tensor.dtype})")
    print(f"  Shape:              {tensor.shape}")
    print(f"  Mean:               {np.mean(tensor, dtype=np.float64):.6g}")
    print(f"  Standard Deviation: {np.std(tensor, dtype=np.float64):.6g}")
    print(f"  Min:                {np.min(tensor):.6g}")
    print(f"  Max:                {np.max(tensor):.6g}")


def _interleaved_medians(contenders: dict[str, Callable[[], object]], repeat: int) -> dict:
    """Median seconds per contender, running them round-robin so drift hits all alike."""
    for run in contenders.values():
        run()  # compile and warm caches outside the timed runs
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def _torch_contender(tensor: np.ndarray, num_groups: int, layout: str):
    try:
        import torch
    except ImportError:
        return None
    import numba

    torch.set_num_threads(numba.get_num_threads())
    source = torch.from_numpy(tensor)
    if layout == "NHWC":  # the same memory as a channels_last NCHW tensor
        source = source.permute(0, tensor.ndim - 1, *range(1, tensor.ndim - 1))
    return lambda: torch.nn.functional.group_norm(source, num_groups)


def demo(shape: Sequence[int], num_groups: int, layout: str, dtype: str, repeat: int) -> int:
    """Run the walkthrough with nbgn and print statistics and side-by-side timings."""
    rng = np.random.default_rng(0)
    tensor = rng.random(tuple(shape), dtype=np.float64).astype(dtype)
    if layout == "NHWC":
        tensor = np.ascontiguousarray(np.moveaxis(tensor, 1, -1))
    print(f"nbgn {nbgn.__version__}: group norm of a random {tuple(shape)} {dtype} tensor, "
          f"{num_groups} groups, layout {layout}\n")  # fmt: skip
    print_stats("Before", tensor)
    result = nbgn.group_norm(tensor, num_groups, layout=layout)
    print_stats("After nbgn.group_norm", result)
    _, input_var = nbgn.group_moments(tensor, num_groups, layout=layout)
    mean, var = nbgn.group_moments(result, num_groups, layout=layout)
    expected_var = input_var / (input_var + 1e-5)
    print(f"  Per group: |mean| <= {np.abs(mean).max():.1e}, variance within "
          f"{np.abs(var - expected_var).max():.1e} of var / (var + eps)\n")  # fmt: skip

    work = tensor.copy()
    contenders: dict[str, Callable[[], object]] = {
        "nbgn in place": lambda: nbgn.group_norm(work, num_groups, layout=layout, out=work),
        "nbgn allocating": lambda: nbgn.group_norm(tensor, num_groups, layout=layout),
        "numpy baseline": lambda: nbgn.baseline.group_norm(tensor, num_groups, layout=layout),
    }
    torch_run = _torch_contender(tensor, num_groups, layout)
    if torch_run is not None:
        contenders["pytorch"] = torch_run
    import numba

    print(f"Timing {repeat} interleaved runs each ({numba.get_num_threads()} threads, "
          f"threading layer {numba.threading_layer()}), median:")  # fmt: skip
    medians = _interleaved_medians(contenders, repeat)
    reference = medians["nbgn in place"]
    for name, seconds in medians.items():
        print(f"  {name:<16} {seconds * 1e3:9.2f} ms   {seconds / reference:6.2f}x nbgn in place   "
              f"{2 * tensor.nbytes / seconds / 1e9:6.1f} GB/s")  # fmt: skip
    if torch_run is None:
        print("  (PyTorch is not installed: pip install torch==2.13.0 to compare)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from . import _bench

        return _bench.main(argv[1:])
    if argv and argv[0] == "info":
        from . import _info

        return _info.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m nbgn",
        description="Group norm walkthrough demo. Subcommands: 'bench' (side-by-side speed "
        "table, see 'python -m nbgn bench --help') and 'info' (versions, threading, CPU).",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs="+",
        default=[64, 16, 112, 112],
        help="N C *spatial, in that order for either layout (default 64 16 112 112)",
    )
    parser.add_argument("--groups", type=int, default=4, help="num_groups (default 4)")
    parser.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per contender")
    args = parser.parse_args(argv)
    return demo(args.shape, args.groups, args.layout, args.dtype, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
