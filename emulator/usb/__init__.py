"""Emulated AP adapters as USB devices: descriptors from data, the device model.

The pyusb-facing part (the ``IBackend`` and the virtual bus) is :mod:`emulator.usb_backend`.
"""
