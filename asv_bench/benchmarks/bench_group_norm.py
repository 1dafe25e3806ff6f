"""Time of nbgn's group norm and moments, of the NumPy baseline and of PyTorch, per shape class."""

import numba
import numpy as np

import nbgn

from .common import CASES, DTYPES, LAYOUTS, THREADS, make_input, set_threads


class GroupNorm:
    """nbgn in place, into ``out=``, allocating; its moments and layer."""

    params = [list(CASES), LAYOUTS, DTYPES, THREADS]
    param_names = ["case", "layout", "dtype", "threads"]
    timeout = 300

    def setup(self, case, layout, dtype, threads):
        self.previous_threads = set_threads(threads)
        self.x, self.groups, self.weight, self.bias = make_input(case, layout, dtype)
        self.work = self.x.copy()
        self.out = np.empty_like(self.x)
        channels = self.x.shape[1 if layout == "NCHW" else -1]
        self.layer = nbgn.GroupNorm(self.groups, channels, layout=layout)
        self.layout = layout
        # Compile everything timed below, outside the timed region.
        self.time_group_norm_inplace(case, layout, dtype, threads)
        self.time_group_norm_out(case, layout, dtype, threads)
        self.time_group_norm_allocating(case, layout, dtype, threads)
        self.time_group_moments(case, layout, dtype, threads)
        self.time_layer(case, layout, dtype, threads)

    def teardown(self, case, layout, dtype, threads):
        numba.set_num_threads(self.previous_threads)

    def time_group_norm_inplace(self, case, layout, dtype, threads):
        nbgn.group_norm(
            self.work, self.groups, self.weight, self.bias, layout=self.layout, out=self.work
        )

    def time_group_norm_out(self, case, layout, dtype, threads):
        nbgn.group_norm(
            self.x, self.groups, self.weight, self.bias, layout=self.layout, out=self.out
        )

    def time_group_norm_allocating(self, case, layout, dtype, threads):
        nbgn.group_norm(self.x, self.groups, self.weight, self.bias, layout=self.layout)

    def time_group_moments(self, case, layout, dtype, threads):
        nbgn.group_moments(self.x, self.groups, layout=self.layout)

    def time_layer(self, case, layout, dtype, threads):
        self.layer(self.x)


class BaselineGroupNorm:
    """The vectorized NumPy baseline on the same inputs (single-threaded: no thread parameter)."""

    params = [list(CASES), LAYOUTS, DTYPES]
    param_names = ["case", "layout", "dtype"]
    timeout = 300

    def setup(self, case, layout, dtype):
        self.x, self.groups, self.weight, self.bias = make_input(case, layout, dtype)
        self.layout = layout

    def time_baseline_group_norm(self, case, layout, dtype):
        nbgn.baseline.group_norm(self.x, self.groups, self.weight, self.bias, layout=self.layout)

    def time_baseline_group_moments(self, case, layout, dtype):
        nbgn.baseline.group_moments(self.x, self.groups, layout=self.layout)


class TorchGroupNorm:
    """``torch.nn.functional.group_norm`` on the same inputs (channels_last tensors for NHWC),
    with as many threads as nbgn; skipped where PyTorch is not installed."""

    params = [list(CASES), LAYOUTS, DTYPES, THREADS]
    param_names = ["case", "layout", "dtype", "threads"]
    timeout = 300

    def setup(self, case, layout, dtype, threads):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("PyTorch is not installed") from None
        self.torch = torch
        self.previous_threads = set_threads(threads)
        self.previous_torch_threads = torch.get_num_threads()
        torch.set_num_threads(numba.get_num_threads())
        x, self.groups, weight, bias = make_input(case, layout, dtype)
        tensor = torch.from_numpy(x)
        if layout == "NHWC":
            tensor = tensor.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
        self.tensor, self.weight, self.bias = (
            tensor,
            torch.from_numpy(weight),
            torch.from_numpy(bias),
        )
        self.time_torch_group_norm(case, layout, dtype, threads)

    def teardown(self, case, layout, dtype, threads):
        if not hasattr(self, "torch"):  # setup skipped: asv calls teardown all the same
            return
        numba.set_num_threads(self.previous_threads)
        self.torch.set_num_threads(self.previous_torch_threads)

    def time_torch_group_norm(self, case, layout, dtype, threads):
        self.torch.nn.functional.group_norm(self.tensor, self.groups, self.weight, self.bias)
