"""The gdbstub transport: RSP codec, a socket client for the hot path, and a gdb/MI one."""

from kprobevm.gdbstub.client import BreakpointKind, ClientStats, GdbAddress, GdbClient
from kprobevm.gdbstub.packet import StopReply, WatchHit, parse_stop_reply
from kprobevm.gdbstub.regs import Register, RegisterLayout
from kprobevm.gdbstub.transport import GdbTransport

__all__ = [
    "BreakpointKind",
    "ClientStats",
    "GdbAddress",
    "GdbClient",
    "GdbTransport",
    "Register",
    "RegisterLayout",
    "StopReply",
    "WatchHit",
    "parse_stop_reply",
]
