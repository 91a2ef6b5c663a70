"""CPU streams: the plan chosen from the cores, and results handed back in input order."""

from __future__ import annotations

import threading
import time

import pytest

from roadwork_cli.runtime.streams import StreamPlan, local_pool, ordered_map, resolve_streams


@pytest.mark.parametrize(
    ("setting", "threads", "cores", "expected"),
    [
        ("auto", None, 2, StreamPlan(1, 2)),  # 2 cores: one stream of two threads (the forward as before)
        ("auto", None, 16, StreamPlan(8, 2)),
        ("auto", None, 1, StreamPlan(1, 1)),
        ("auto", 1, 16, StreamPlan(16, 1)),
        (None, 4, 16, StreamPlan(4, 4)),
        (3, None, 16, StreamPlan(3, 5)),
        (2, 1, 2, StreamPlan(2, 1)),
        (4, None, 2, StreamPlan(4, 1)),  # more streams than cores: at least one thread each
    ],
)
def test_the_plan_follows_the_setting_the_threads_and_the_cores(setting, threads, cores, expected):
    assert resolve_streams(setting, threads, cores) == expected


def test_a_stream_count_below_one_is_refused():
    with pytest.raises(ValueError, match="streams"):
        resolve_streams(0, None, 4)


def test_results_come_back_in_input_order_while_several_run_at_once():
    running, most = [], [0]
    lock = threading.Lock()

    def work(k: int) -> int:
        with lock:
            running.append(k)
            most[0] = max(most[0], len(running))
        time.sleep(0.02 * (k % 3 == 0))  # early items finish last: order must come from the input, not completion
        with lock:
            running.remove(k)
        return k * k

    assert list(ordered_map(work, range(12), streams=3)) == [k * k for k in range(12)]
    assert most[0] > 1


def test_each_stream_gets_its_own_decode_pool_and_initialiser():
    seen = []

    def init() -> None:
        threading.current_thread().initialised = True

    def work(_: int) -> tuple:
        pool = local_pool()
        seen.append(pool)
        return getattr(threading.current_thread(), "initialised", False), pool._max_workers

    assert set(ordered_map(work, range(6), streams=2, init=init, decode_threads=3)) == {(True, 3)}
    assert len({id(p) for p in seen}) <= 2
    assert list(ordered_map(lambda _: local_pool(), range(2), streams=1)) == [None, None]


def test_an_error_surfaces_at_its_item_and_leaving_early_stops_the_queue():
    def work(k: int) -> int:
        if k == 3:
            raise RuntimeError("bad batch")
        return k

    results = ordered_map(work, range(10), streams=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad batch"):
        next(results)
    started = []
    stream = ordered_map(lambda k: started.append(k) or k, range(1000), streams=2)
    assert next(stream) == 0
    stream.close()
    assert len(started) <= 5  # at most 2 x streams were ever queued, plus the one taken


def test_auto_aims_at_one_thread_per_stream_where_the_runtime_asks_for_it():
    assert resolve_streams("auto", None, 2, per_stream=1) == StreamPlan(2, 1)
    assert resolve_streams("auto", None, 16, per_stream=1) == StreamPlan(16, 1)
    assert resolve_streams("auto", 2, 16, per_stream=1) == StreamPlan(8, 2)  # runtime.threads wins
