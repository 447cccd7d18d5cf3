"""metrics/timers.DeviceSpan: the device's time for the work queued between start and stop."""

import time

import pytest
import torch

from labkit.metrics.timers import DeviceSpan


def test_a_span_on_the_cpu_is_the_host_time_of_the_calls_inside_it() -> None:
    span = DeviceSpan(torch.device("cpu"))
    span.start()
    time.sleep(0.02)
    span.stop()
    time.sleep(0.05)  # after stop: not counted
    assert 0.02 <= span.seconds() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_a_span_on_cuda_times_the_device_not_the_host() -> None:
    """Work queued inside the span counts though the host returns at once (the device spins for
    1e8 cycles: tens of ms at an H200's clocks); the host's 0.2 s after stop does not."""
    dev = torch.device("cuda")
    torch.cuda._sleep(1000)  # the spin's first call loads it
    span = DeviceSpan(dev)
    span.start()
    span.stop()
    span.seconds()
    t0 = time.perf_counter()
    span.start()
    torch.cuda._sleep(100_000_000)
    span.stop()
    queued = time.perf_counter() - t0
    time.sleep(0.2)
    seconds = span.seconds()
    assert 0.01 < seconds < 0.15 and queued < seconds / 2, (seconds, queued)


def test_timed_work_runs_with_the_collector_paused_after_a_collection() -> None:
    """A cycle left before the timed work is collected on entry; inside, the collector does not run
    (a cycle made there stays until after); afterwards it runs as before."""
    import gc
    import weakref

    from labkit.metrics.timers import collector_paused

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        return weakref.ref(a)

    assert gc.isenabled()
    before = cycle()
    with collector_paused():
        assert before() is None  # collected on entry
        assert not gc.isenabled()
        inside = cycle()
        for _ in range(20000):  # allocations that would trigger collections
            [Node() for _ in range(3)]  # noqa: B018
        assert inside() is not None
    assert gc.isenabled()
    gc.collect()
    assert inside() is None
