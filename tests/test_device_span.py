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
    """Work queued inside the span counts though the host returns at once; host time after stop does not."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)
    torch.cuda.synchronize()
    span = DeviceSpan(dev)
    t0 = time.perf_counter()
    span.start()
    for _ in range(20):
        a = a @ a / 64
    span.stop()
    queued = time.perf_counter() - t0
    time.sleep(0.1)
    seconds = span.seconds()
    assert seconds > queued and seconds < 0.1, (seconds, queued)
