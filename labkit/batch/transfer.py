"""Copies between the host and the device that do not stall steps launched ahead (scheduler.py).

A plain copy from pageable memory, or a plain `.tolist()`, synchronises the stream: it waits for
every step already queued, so a step launched ahead of the host's reading would run alone and the
host's work would no longer overlap it. From pinned memory a copy is queued like a kernel, and a
read can wait on an event recorded behind the one tensor it needs.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def to_device(data: list, device: torch.device) -> torch.Tensor:
    """A host list (of ints, or of lists of ints) as a long tensor on `device`, queued: built
    straight into pinned memory on CUDA (one allocation from the caching host allocator, which
    keeps a block until the copies reading it are done)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=torch.long, device=device)
    return torch.tensor(data, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


@lru_cache(maxsize=64)
def constant(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small long tensor that many steps read (an EOS id list, positions 0..T-1), sent once. Never write to it."""
    return to_device(list(values), device)


class HostCopy:
    """A device tensor's copy to the host, queued behind what produced it. `tolist` waits for that
    copy alone (its event), not for the steps queued after it, as a plain `.tolist()` would."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
