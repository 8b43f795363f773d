"""Bulk-stream reassembly: bytes split anyhow in, whole frames out.

A bulk pipe is a byte stream: one frame may take several transfers, and one transfer may carry the
tail of one frame, several whole frames and the head of the next.  The assembler cuts the stream
with one callable, ``frame_size``, that reads a frame's header (the codec's business, not ours) and
says how long the frame is, or ``None`` while too few header bytes have arrived.  A header the codec
rejects raises from ``frame_size``; the stream is then out of step and only a reset (the device's
answer: stall the pipe until the host clears it) brings it back.
"""

from __future__ import annotations

from collections.abc import Callable

#: reads the header at the start of its argument: total frame length, or None if more bytes are needed
FrameSize = Callable[[bytes], int | None]


class FrameAssembler:
    """Accumulates stream bytes and hands out complete frames in order (sans-I/O, not thread-safe)."""

    __slots__ = ("_buf", "_frame_size", "_need")

    def __init__(self, frame_size: FrameSize) -> None:
        self._frame_size = frame_size
        self._buf = bytearray()
        self._need: int | None = None  # length of the frame at the head, once its header is known

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Append ``data``; return every frame now complete.  Raises what ``frame_size`` raises."""
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need is None:
                self._need = self._frame_size(bytes(self._buf))
                if self._need is None:
                    return frames
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
            if not self._buf:
                return frames

    @property
    def pending(self) -> int:
        """Bytes held that are not yet part of a complete frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Drop everything buffered (after a desynchronised stream or a device reset)."""
        self._buf.clear()
        self._need = None
