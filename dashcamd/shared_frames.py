"""Decoded frames in memory that the pipeline shares with its redaction processes (dashcamd.redact_processes).

One anonymous memory file (Linux ``memfd``, so not bound by the size of /dev/shm, which containers often
set to 64 MB) holds ``slots`` pictures of one size. The kernel allocates a page only when it is first
written, and a freed slot is the next one taken, so the memory in use follows the frames in flight, as
private frames would, not the number of slots.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Callable

import numpy as np

from dashcamd.picture import Picture


def supported() -> bool:
    """Whether this system has anonymous memory files (Linux)."""
    return hasattr(os, "memfd_create")


class SharedFrames:
    """Slots for ``width`` x ``height`` (even) I420 pictures; ``take`` and ``to_frame`` move them in and out.

    ``take`` and the give-back in ``Picture.to_frame`` may run in different threads: a deque's append and
    pop are atomic.
    """

    def __init__(self, width: int, height: int, slots: int, *, fd: int | None = None) -> None:
        self.width, self.height, self.slots = width, height, slots
        self.slot_bytes = -(-width * height * 3 // 2 // mmap.PAGESIZE) * mmap.PAGESIZE
        if fd is None:
            fd = os.memfd_create("dashcamd-frames", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.slot_bytes * slots)
        self.fd = fd
        # The mapping outlives close(): pictures still in the pipeline's queues keep it alive.
        self._memory = np.frombuffer(mmap.mmap(fd, self.slot_bytes * slots), np.uint8)
        self._free: deque[int] = deque(range(slots - 1, -1, -1))  # pop() takes slot 0 first

    @classmethod
    def attach(cls, fd: int, width: int, height: int, slots: int) -> SharedFrames:
        """The same slots in another process, which got ``fd`` (e.g. through ``pass_fds``)."""
        return cls(width, height, slots, fd=fd)

    def take(self) -> Picture | None:
        """A picture in a free slot, or None while every slot is in use (the caller uses a private one)."""
        try:
            slot = self._free.pop()
        except IndexError:
            return None
        return self.picture(slot, give_back=self._free.append)

    def picture(self, slot: int, give_back: Callable[[int], None] | None = None) -> Picture:
        """The picture in ``slot``; ``give_back(slot)`` runs once it is copied out to the encoder."""
        start = slot * self.slot_bytes
        return Picture.in_slot(self._memory[start:start + self.slot_bytes], self.width, self.height, slot,
                               give_back)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Close the memory file (the mapping goes when its last picture does)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
