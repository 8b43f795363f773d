"""The pyusb error triples a real libusb1 backend raises, so fault handling is tested against them.

``usb.backend.libusb1._check`` builds ``USBError(strerror, libusb_code, errno)``; the strings below
are libusb's own (``_str_error_map``), so a log line from the emulator reads like one from hardware.
"""

from __future__ import annotations

import errno

import usb.core

LIBUSB_ERROR_NOT_FOUND = -5
LIBUSB_ERROR_BUSY = -6
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_PIPE = -9
LIBUSB_ERROR_INVALID_PARAM = -2


def timeout_error(what: str = "") -> usb.core.USBTimeoutError:
    return usb.core.USBTimeoutError(_msg("Operation timed out", what), LIBUSB_ERROR_TIMEOUT, errno.ETIMEDOUT)


def no_device_error(what: str = "") -> usb.core.USBError:
    return usb.core.USBError(
        _msg("No such device (it may have been disconnected)", what), LIBUSB_ERROR_NO_DEVICE, errno.ENODEV
    )


def pipe_error(what: str = "") -> usb.core.USBError:
    return usb.core.USBError(_msg("Pipe error", what), LIBUSB_ERROR_PIPE, errno.EPIPE)


def busy_error(what: str = "") -> usb.core.USBError:
    return usb.core.USBError(_msg("Resource busy", what), LIBUSB_ERROR_BUSY, errno.EBUSY)


def not_found_error(what: str = "") -> usb.core.USBError:
    return usb.core.USBError(_msg("Entity not found", what), LIBUSB_ERROR_NOT_FOUND, errno.ENOENT)


def invalid_param_error(what: str = "") -> usb.core.USBError:
    return usb.core.USBError(_msg("Invalid parameter", what), LIBUSB_ERROR_INVALID_PARAM, errno.EINVAL)


def _msg(base: str, what: str) -> str:
    return f"{base} ({what})" if what else base
