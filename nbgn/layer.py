"""``GroupNorm``: a layer object holding the affine parameters, like ``torch.nn.GroupNorm``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import LAYOUTS, check_count, check_eps, divisors
from .api import group_norm


class GroupNorm:
    """Group normalization layer: ``layer(x)`` is ``group_norm(x, num_groups, weight, bias)``.

    Parameters
    ----------
    num_groups : int
        Number of groups; must divide ``num_channels``.
    num_channels : int
        C, the number of channels the layer expects.
    eps : float, default 1e-5
        Added to the variance.
    affine : bool, default True
        Hold a per-channel ``weight`` (ones) and ``bias`` (zeros), float32 arrays of shape (C,),
        that may be replaced or edited in place; without, both are None.
    layout : {"NCHW", "NHWC"}, default "NCHW"
        Where the channel axis of the inputs is.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        layout: str = "NCHW",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout must be 'NCHW' (channels first) or 'NHWC' (channels last), got {layout!r}."
            )
        groups = check_count(num_groups, "num_groups")
        channels = check_count(num_channels, "num_channels", minimum=0)
        if channels % groups:
            raise ValueError(
                f"num_groups={groups} does not divide num_channels={channels}; choose one of "
                f"{divisors(channels)}."
            )
        self.num_groups = groups
        self.num_channels = channels
        self.eps = check_eps(eps)
        self.affine = bool(affine)
        self.layout = layout
        self.weight: np.ndarray | None = np.ones(num_channels, np.float32) if affine else None
        self.bias: np.ndarray | None = np.zeros(num_channels, np.float32) if affine else None

    def __call__(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Normalize ``x`` (shape (N, C, *spatial) or (N, *spatial, C)); ``out=x`` for in place."""
        shape = np.shape(x)
        channels = shape[-1 if self.layout == "NHWC" else 1] if len(shape) >= 2 else None
        if channels is not None and channels != self.num_channels:
            raise ValueError(
                f"x has {channels} channels (shape {shape}, layout {self.layout}), but this layer "
                f"was built for num_channels={self.num_channels}."
            )
        return group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            eps=self.eps,
            layout=self.layout,
            out=out,
        )

    def __repr__(self) -> str:
        return (
            f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, layout={self.layout!r})"
        )
