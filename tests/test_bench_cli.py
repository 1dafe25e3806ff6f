"""python -m nbgn bench: the table and the JSON report."""

import json

import pytest

from nbgn import _bench


def test_json_report(capsys):
    assert _bench.main(["--quick", "--json", "--repeat", "2", "--dtype", "float32", "float64"]) == 0
    report = json.loads(capsys.readouterr().out)
    machine = report["machine"]
    assert machine["threads"] >= 1
    assert machine["threading_layer"]
    assert machine["versions"]["numba"]
    rows = report["results"]
    contenders = {row["contender"] for row in rows}
    assert {"nbgn in place", "nbgn allocating", "numpy baseline", "roofline x *= a",
            "two-pass floor"} <= contenders  # fmt: skip
    assert {(row["layout"], row["dtype"]) for row in rows} == {
        (layout, dtype) for layout in ("NCHW", "NHWC") for dtype in ("float32", "float64")
    }
    for row in rows:
        assert row["seconds"] > 0
        assert row["gb_per_s"] > 0
        assert row["roofline"] > 0
        if row["contender"] == "nbgn in place":
            assert row["vs_nbgn_in_place"] == 1.0


def test_table_with_explicit_shapes_and_threads(capsys):
    import numba

    before = numba.get_num_threads()
    assert _bench.main(["--shape", "2", "8", "6", "6", "--groups", "4", "--layout", "NHWC",
                        "--threads", "1", "--repeat", "2"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "threads: 1" in captured.out
    assert "shape 1 (2, 8, 6, 6)/4" in captured.out
    assert "nbgn in place" in captured.out
    assert "[1/1]" in captured.err  # the progress line
    assert numba.get_num_threads() == before  # restored


def test_pytorch_column_when_installed(capsys):
    pytest.importorskip("torch")
    _bench.main(["--shape", "2", "8", "4", "4", "--groups", "4", "--repeat", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)["results"]
    assert "pytorch" in {row["contender"] for row in rows}


def test_mismatched_groups_are_refused():
    with pytest.raises(SystemExit):
        _bench.main(["--shape", "2", "8", "4", "4", "--groups", "4", "2"])


def test_cold_mode_flushes_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(_bench, "FLUSH_BYTES", 2**20)  # the mechanism, not a 256 MiB sweep
    assert _bench.main(["--shape", "2", "8", "6", "6", "--groups", "4", "--repeat", "2",
                        "--cold", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["cold"] is True
    assert all(row["seconds"] > 0 for row in report["results"])
    assert _bench.main(["--shape", "2", "8", "6", "6", "--groups", "4", "--repeat", "2"]) == 0
    assert "each in steady state" in capsys.readouterr().out


def test_every_timed_sample_follows_a_warm_up_of_its_own_contender(monkeypatch):
    """Untimed calls of a contender for WARM_UP_SECONDS, then its timed calls: no timed sample
    starts in the state another contender left."""
    import time

    monkeypatch.setattr(_bench, "MIN_MEASUREMENT_SECONDS", 0.0)  # one timed call a sample
    calls = []

    def contender(name):
        return lambda: calls.append((name, time.perf_counter()))

    medians = _bench.time_side_by_side(
        {"nbgn in place": contender("a"), "b": contender("b")}, repeat=3
    )
    assert set(medians) == {"nbgn in place", "b"}
    names = [name for name, _ in calls]
    runs = []  # (name, first call time, last call time) of each run of one contender's calls
    for index, (name, moment) in enumerate(calls):
        if index == 0 or names[index - 1] != name:
            runs.append([name, moment, moment])
        runs[-1][2] = moment
    # The compile-and-warm calls (a, b), then per repeat a run of each contender: warm-up calls
    # spanning WARM_UP_SECONDS, then the timed one (the first run of a also holds the call that
    # sized the measurements).
    timed_runs = runs[2:]
    assert [run[0] for run in timed_runs] == ["a", "b"] * 3
    for name, first, last in timed_runs:
        assert last - first >= _bench.WARM_UP_SECONDS, name
