"""Code run at the top of subprocess scenarios."""

import textwrap

#: Makes libtbb unloadable through ctypes before nbgn is imported, as on a machine without tbb.
HIDE_TBB = textwrap.dedent(
    """
    import ctypes
    _real_cdll = ctypes.CDLL
    def _no_tbb(name, *args, **kwargs):
        if "tbb" in str(name):
            raise OSError("tbb hidden by the test")
        return _real_cdll(name, *args, **kwargs)
    ctypes.CDLL = _no_tbb
    """
)
