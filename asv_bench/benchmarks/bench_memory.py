"""Peak memory: in place allocates nothing proportional to the input; allocating, only the output."""

import nbgn

from .common import make_input


class GroupNormPeakMemory:
    """The process's peak resident memory; ``x`` itself is part of every figure."""

    params = [["seed", "resnet", "tiny"], ["NCHW", "NHWC"]]
    param_names = ["case", "layout"]

    def setup(self, case, layout):
        self.x, self.groups, self.weight, self.bias = make_input(case, layout, "float32")
        self.layout = layout
        # Compile outside the measurement, allocating less than the calls measured: in place on
        # x itself, and out of place on a view of a few samples (large enough to run parallel).
        nbgn.group_norm(self.x, self.groups, self.weight, self.bias, layout=layout, out=self.x)
        nbgn.group_norm(self.x[:4], self.groups, self.weight, self.bias, layout=layout)

    def peakmem_group_norm_inplace(self, case, layout):
        nbgn.group_norm(self.x, self.groups, self.weight, self.bias, layout=self.layout, out=self.x)

    def peakmem_group_norm_allocating(self, case, layout):
        nbgn.group_norm(self.x, self.groups, self.weight, self.bias, layout=self.layout)

    def peakmem_baseline_group_norm(self, case, layout):
        nbgn.baseline.group_norm(self.x, self.groups, self.weight, self.bias, layout=self.layout)
