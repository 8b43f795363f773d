"""Runners drive the sans-I/O core: they own the clock, the transport and the callers' futures.

Three of them share :class:`~apcrypto.runners.base.RunnerBase` (how actions are carried out): a
threaded runner (wall clock, or an emulator's virtual clock with autojump), an asyncio runner and a
simulation runner that drives core and in-process emulator on one virtual clock, deterministically.
"""
