"""Bulk-stream reassembly lives in :class:`apformats.frames.FrameStream`: one reassembler serves both
ends of the USB path (the device on bulk OUT, the host on bulk IN and interrupt IN).

This module only keeps :data:`FrameSize` (the header-reader hook ``VirtualUsbDevice`` accepts) importable
under its old name for :mod:`emulator.usb_backend`.
"""

from __future__ import annotations

from apformats.frames import FrameSize

__all__ = ["FrameSize"]
