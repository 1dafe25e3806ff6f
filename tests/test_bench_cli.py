"""python -m nbgn bench: the table and the JSON report."""

import json
import statistics

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
        if row["contender"] == "roofline x *= a":
            assert row["roofline"] == 1.0
        assert (row["vs_pytorch"] is None) == ("pytorch" not in contenders)


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
    for row in rows:
        assert row["vs_pytorch"] > 0
        if row["contender"] == "pytorch":
            assert row["vs_pytorch"] == 1.0


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


def test_thread_scaling_times_each_count_in_turn_and_restores_threads(monkeypatch):
    """Each timed call runs after a warm-up at its own count, the counts in turn, each repeat
    starting one further on; a sample per repeat and count; the caller's count comes back."""
    import numba

    monkeypatch.setattr(_bench, "MIN_MEASUREMENT_SECONDS", 0.0)
    monkeypatch.setattr(_bench, "WARM_UP_SECONDS", 0.0)
    before = numba.get_num_threads()
    counts = [1, numba.config.NUMBA_NUM_THREADS]
    calls = []
    samples = _bench.sample_thread_scaling(lambda: calls.append(numba.get_num_threads()), counts, 4)
    assert set(samples) == set(counts)
    assert all(len(values) == 4 * counts.count(count) for count, values in samples.items())
    assert all(seconds > 0 for values in samples.values() for seconds in values)
    assert numba.get_num_threads() == before
    # A compile call per count, the sizing warm-up and call, then per repeat and count: a warm-up
    # call, a timed call.
    timed = calls[len(counts) + 2 :]
    assert len(timed) == 2 * 4 * len(counts)
    pairs = [timed[k : k + 2] for k in range(0, len(timed), 2)]
    assert all(warm == measured for warm, measured in pairs)
    expected = [count for r in range(4) for count in counts[r % 2 :] + counts[: r % 2]]
    assert [measured for _, measured in pairs] == expected


def test_scaling_report(capsys):
    import numba

    before = numba.get_num_threads()
    args = ["--scaling", "--shape", "1", "8", "16", "16", "--groups", "1", "--repeat", "2"]
    assert _bench.main([*args, "--dtype", "float32", "float64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["scaling"]
    assert {(row["layout"], row["dtype"]) for row in rows} == {
        (layout, dtype) for layout in ("NCHW", "NHWC") for dtype in ("float32", "float64")
    }
    for row in rows:
        assert row["threads"] == numba.config.NUMBA_NUM_THREADS
        assert row["speedup"] > 0
    assert numba.get_num_threads() == before
    assert _bench.main([*args, "--layout", "NHWC", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "one group" not in text  # the given shape, not the default case
    row = next(line for line in text.splitlines() if line.startswith("shape 1 (1, 8, 16, 16)/1"))
    assert row.split()[6:8] == ["NHWC", "float32"]
    assert "speedup" in text


def test_startup_report_times_fresh_processes(capsys):
    """One pair of fresh processes (after the untimed pair): nbgn's parts add up to its in-process
    time, which its whole process (start and exit too) exceeds."""
    assert _bench.main(["--startup", "--repeat", "1", "--json"]) == 0
    startup = json.loads(capsys.readouterr().out)["startup"]
    assert set(startup["parts"]) == set(_bench.STARTUP_PARTS)
    assert all(seconds > 0 for seconds in startup["parts"].values())
    inside, whole = startup["in_process"], startup["whole_process"]
    assert inside["nbgn_seconds"] == pytest.approx(sum(startup["parts"].values()))
    assert whole["nbgn_seconds"] > inside["nbgn_seconds"]
    assert whole["baseline_seconds"] > inside["baseline_seconds"]
    for row in (inside, whole):
        assert row["ratio"] == pytest.approx(row["nbgn_seconds"] / row["baseline_seconds"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--startup", "--scaling"], "not allowed with argument"),
        (["--startup", "--shape", "2", "8", "4", "4"], "takes only --repeat and --json"),
        (["--startup", "--threads", "1"], "takes only --repeat and --json"),
        (["--scaling", "--cold"], "apply to the table"),
        (["--scaling", "--quick"], "apply to the table"),
    ],
)
def test_options_a_mode_would_ignore_are_refused(args, message, capsys):
    with pytest.raises(SystemExit):
        _bench.main(args)
    assert message in capsys.readouterr().err


def test_a_failing_startup_process_says_what_it_printed(monkeypatch):
    monkeypatch.setattr(_bench, "STARTUP_NBGN", "raise SystemExit('no nbgn here')")
    with pytest.raises(RuntimeError, match="no nbgn here"):
        _bench.time_startup(repeat=1)


def test_paired_ratio_is_the_median_of_ratios_within_repeats():
    """Not the ratio of the medians: a slow spell that hits both samples of a repeat cancels."""
    samples = {"a": [1.0, 10.0, 2.0, 20.0, 3.0], "b": [2.0, 20.0, 4.0, 40.0, 6.0]}
    assert _bench.paired_ratio(samples, "a", "b") == 0.5
    samples = {"a": [1.0, 2.0, 9.0], "b": [2.0, 1.0, 3.0]}  # ratios 0.5, 2 and 3
    assert _bench.paired_ratio(samples, "a", "b") == 2.0
    assert statistics.median(samples["a"]) / statistics.median(samples["b"]) == 1.0
