"""Every asv benchmark runs once on its smallest parameters, so the suite cannot rot."""

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "asv_bench"))

MODULES = ["benchmarks.bench_group_norm", "benchmarks.bench_memory", "benchmarks.bench_tracking"]
PREFIXES = ("time_", "peakmem_", "track_")


def _benchmarks():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for class_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            for name, _ in inspect.getmembers(cls, inspect.isfunction):
                if name.startswith(PREFIXES):
                    yield pytest.param(
                        cls, name, id=f"{module_name.split('.')[-1]}.{class_name}.{name}"
                    )


def _smallest(cls):
    """The tiny case where there is one, else each parameter's first value."""
    return [("tiny" if "tiny" in values else values[0]) for values in cls.params]


@pytest.mark.parametrize(("cls", "name"), list(_benchmarks()))
def test_benchmark_runs(cls, name):
    threads = numba.get_num_threads()
    params = _smallest(cls)
    instance = cls()
    instance.setup(*params)
    try:
        result = getattr(instance, name)(*params)
        if name.startswith("track_"):
            assert result > 0
            assert getattr(cls, name).unit
    finally:
        if hasattr(instance, "teardown"):
            instance.teardown(*params)
    assert numba.get_num_threads() == threads


def test_asv_discovers_exactly_the_benchmarks_run_here():
    # asv takes any module-level function named time_* (an import too) for a benchmark.
    discovery = pytest.importorskip("asv_runner.discovery")
    found = {b.name for b in discovery.disc_benchmarks(str(ROOT / "asv_bench" / "benchmarks"))}
    run_here = {test.id for test in _benchmarks()}
    assert found == run_here


def test_every_class_declares_its_parameters():
    classes = {test.values[0] for test in _benchmarks()}
    assert len(classes) >= 4
    for cls in classes:
        assert len(cls.params) == len(cls.param_names)


PEAKMEM = """
import re, sys
sys.path.insert(0, {asv_bench!r})
from benchmarks.bench_memory import GroupNormPeakMemory
benchmark = GroupNormPeakMemory()
benchmark.setup("seed", "NCHW")
getattr(benchmark, {name!r})("seed", "NCHW")
with open("/proc/self/status") as status:
    peak_kib = re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)
print(int(peak_kib) * 1024, benchmark.x.nbytes)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
def test_peakmem_tells_in_place_from_allocating(tmp_path):
    # asv's peakmem_ is the peak of the whole process, setup included (as here): a setup that
    # peaked above x plus the output (it drew float64 and cast) hid the output allocation. A cold
    # cache makes setup compile too. VmHWM is that peak without the floor ru_maxrss inherits
    # from the parent (pytest here; in asv, its small forkserver).
    names = ["peakmem_group_norm_inplace", "peakmem_group_norm_allocating"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PEAKMEM.format(asv_bench=str(ROOT / "asv_bench"), name=name)],
            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / name)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    peaks = {}
    for name, process in zip(names, processes, strict=True):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        peaks[name], nbytes = map(int, stdout.split())
    grew = peaks["peakmem_group_norm_allocating"] - peaks["peakmem_group_norm_inplace"]
    assert 0.9 * nbytes <= grew <= 1.2 * nbytes, (
        f"{grew / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB output"
    )


def test_torch_benchmarks_skip_cleanly_without_pytorch(monkeypatch):
    # asv skips a benchmark whose setup raises NotImplementedError, and still calls teardown.
    from benchmarks.bench_group_norm import TorchGroupNorm

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    params = _smallest(TorchGroupNorm)
    instance = TorchGroupNorm()
    with pytest.raises(NotImplementedError, match="PyTorch is not installed"):
        instance.setup(*params)
    instance.teardown(*params)
