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
    """Untimed calls of a contender for at least WARM_UP_SECONDS, then its timed calls: no timed
    sample starts in the state another contender left. Each repeat starts with a different
    contender."""
    import time

    monkeypatch.setattr(_bench, "MIN_MEASUREMENT_SECONDS", 0.0)  # one timed call a sample
    events = []  # ("call", name, time), and ("warm", name, time) when a warm-up starts
    warm_up = _bench._warm_up

    def recorded_warm_up(run, seconds):
        events.append(("warm", run.__name__, time.perf_counter()))
        warm_up(run, seconds)

    monkeypatch.setattr(_bench, "_warm_up", recorded_warm_up)

    def contender(name):
        def run():
            events.append(("call", name, time.perf_counter()))

        run.__name__ = name
        return run

    names = ["nbgn in place", "b", "c"]
    medians = _bench.time_side_by_side({name: contender(name) for name in names}, repeat=3)
    assert set(medians) == set(names)
    # After the compile-and-warm calls: segments of a warm-up and the calls that follow it (the
    # first one sizes the measurements), each of one contender.
    first = next(i for i, event in enumerate(events) if event[0] == "warm")
    assert [event[1] for event in events[:first]] == names
    segments = []
    for event in events[first:]:
        if event[0] == "warm":
            segments.append((event[1], [event[2]]))
        else:
            assert event[1] == segments[-1][0]  # only the warmed-up contender runs
            segments[-1][1].append(event[2])
    assert len(segments) == 1 + 3 * len(names)
    for name, moments in segments:  # the warm-up's start, its calls, then the measured call
        assert len(moments) >= 1 + 1 + 1, name
        assert moments[-1] - moments[0] >= _bench.WARM_UP_SECONDS, name
    order = [name for name, _ in segments[1:]]
    repeats = [order[k : k + len(names)] for k in range(0, len(order), len(names))]
    assert all(sorted(r) == sorted(names) for r in repeats)
    assert len({r[0] for r in repeats}) == 3  # each repeat starts with another contender
