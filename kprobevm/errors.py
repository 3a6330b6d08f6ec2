"""The one error tree of kprobevm; every error carries the facts that explain it.

Modelled on ``qemu.qmp.error``: catch :class:`KprobeVMError` for anything kprobevm
raises, or a narrower class for one failure. Lower-level causes are chained with
``raise ... from``. ``KeyboardInterrupt`` is never wrapped.

::

    KprobeVMError
     +-- ImageError                   building the guest image failed (step, command, output)
     +-- DebugInfoError               the guest kernel's DWARF vmlinux could not be had (package,
     |                                step, command, output)
     +-- QemuBinaryError              a QEMU binary could not be fetched, unpacked or asked its
     |                                version (step, command line, output tail)
     +-- VMError                      a guest could not be started, reached or kept
     |    +-- VMLaunchFailure          QEMU failed to start (exit code, command line, log tail)
     |    |    +-- QEMUNotFound        the QEMU binary is missing
     |    |    +-- GuestNotReady       the guest never answered SSH within the timeout
     |    +-- VMLost                   QEMU went away while we used it (exit status,
     |                                 serial log tail)
     +-- GuestCommandError            ``vm.run(check=True)`` saw a non-zero status
     +-- GuestCommandTimeout          ``vm.run`` did not finish in time
     +-- GdbError                     the gdbstub conversation failed (packet sent, reply received)
     |    +-- GdbProtocolError         malformed, oversized or unexpected packet
     |    +-- GdbErrorReply            the stub answered ``Exx``
     |    +-- GdbTimeout               no reply in time
     |    +-- GdbConnectionClosed      the stub closed the connection
     |    +-- UnknownRegister          a register the target description does not name
     |                                 (also a ``KeyError``)
     +-- GuestMemoryError             guest memory could not be accessed
     |    +-- GuestFaultError          an address is not mapped (address, and why)
     |    +-- TaskWalkError            the guest's task list could not be walked (task, count)
     +-- SymbolError                  kernel symbols
     |    +-- SymbolNotFound           no such symbol (also a ``KeyError``)
     |    +-- AmbiguousSymbol          a name that several symbols share
     +-- VmlinuxError                 the vmlinux ELF could not be read or extracted
     |    +-- VmlinuxMismatch          a vmlinux of another build than the kernel it is for
     |                                 (both build ids or banners)
     +-- KaslrError                   the kernel's slide could not be found
     +-- KprobeError                  a probe cannot be placed, armed or removed (symbol, address)
     |    +-- ProbeRefused             a safety check refused the probe (kernel error name)
     |    +-- ProbeTextChanged         the guest changed bytes we own
     |    +-- SlotExhausted            no instruction slot could be had
     |    +-- NoSlotMemory             no guest memory for slots could be found (why)
     +-- ProbeSyntaxError             a kprobe_events definition is invalid (code, position)
     +-- JournalError                 the write journal is unreadable or does not match the guest
 +-- DrgnError                    a drgn Program for the guest could not be made (what to do)
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

__all__ = [
    "LOST_ERRORS",
    "AmbiguousSymbol",
    "DebugInfoError",
    "DrgnError",
    "GdbConnectionClosed",
    "GdbError",
    "GdbErrorReply",
    "GdbProtocolError",
    "GdbTimeout",
    "GuestCommandError",
    "GuestCommandTimeout",
    "GuestFaultError",
    "GuestMemoryError",
    "GuestNotReady",
    "ImageError",
    "JournalError",
    "KaslrError",
    "KprobeError",
    "KprobeVMError",
    "NoSlotMemory",
    "ProbeRefused",
    "ProbeSyntaxError",
    "ProbeTextChanged",
    "QEMUNotFound",
    "QemuBinaryError",
    "SlotExhausted",
    "SymbolError",
    "SymbolNotFound",
    "TaskWalkError",
    "UnknownRegister",
    "VMError",
    "VMLaunchFailure",
    "VMLost",
    "VmlinuxError",
    "VmlinuxMismatch",
]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.splitlines()[-lines:])


class KprobeVMError(Exception):
    """Root of every error kprobevm raises."""


class ImageError(KprobeVMError):
    """Building the guest image failed at ``step``."""

    def __init__(self, message: str, *, step: str = "", command: str = "", output: str = ""):
        self.step = step
        self.command = command
        self.output = output
        text = message
        if step:
            text += f" (step: {step})"
        if command:
            text += f"\n  command: {command}"
        if output:
            text += "\n  output:\n" + _tail(output)
        super().__init__(text)


class DebugInfoError(KprobeVMError):
    """The DWARF vmlinux of a kernel package (its ``-dbg`` package) could not be
    downloaded or extracted at ``step``; carries the command and its output's tail."""

    def __init__(self, message: str, *, package: str, step: str, command: str = "",
                 output: str = ""):  # fmt: skip
        self.package = package
        self.step = step
        self.command = command
        self.output = output
        text = f"{message} ({package}, step: {step})"
        if command:
            text += f"\n  command: {command}"
        if output:
            text += "\n  output:\n" + _tail(output)
        super().__init__(text)


class QemuBinaryError(KprobeVMError):
    """A QEMU binary could not be fetched, unpacked or run at ``step``; carries the
    command line and the tail of its output."""

    def __init__(
        self, message: str, *, step: str = "", command: Sequence[str] = (), output: str = ""
    ):
        self.step = step
        self.command = list(command)
        self.output = output
        text = message
        if step:
            text += f" (step: {step})"
        if self.command:
            text += "\n  command: " + shlex.join(self.command)
        if output.strip():
            text += "\n  output:\n" + _tail(output)
        super().__init__(text)


class VMError(KprobeVMError):
    """A guest could not be started, reached or kept."""


class VMLaunchFailure(VMError):
    """QEMU failed to start or to bring the guest up; carries its command line and log tail."""

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        command: list[str] | None = None,
        output: str = "",
        serial_log: str = "",
    ):
        self.exitcode = exitcode
        self.command = list(command or [])
        self.output = output
        self.serial_log = serial_log
        text = message
        if exitcode is not None:
            text += f"\n  exit code: {exitcode}"
        if self.command:
            text += "\n  command: " + " ".join(self.command)
        if output.strip():
            text += "\n  qemu output:\n" + _tail(output)
        if serial_log.strip():
            text += "\n  serial log tail:\n" + _tail(serial_log)
        super().__init__(text)


class QEMUNotFound(VMLaunchFailure):
    """The QEMU binary named by the launcher does not exist."""


class GuestNotReady(VMLaunchFailure):
    """The guest did not answer over SSH before the timeout."""


class VMLost(VMError):
    """QEMU went away (or its gdbstub or SSH did) while kprobevm was using it.

    Carries what is known of the end: ``exitcode`` (QEMU's exit status, None while it
    runs or when it is not ours), ``qemu_exited`` (QEMU is known to have exited: its
    gdbstub said so, or its process ended), ``guest_said`` (the console line that says
    how the guest kernel ended: its panic, or its reboot), QEMU's output and the serial
    log's tail.
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        qemu_exited: bool = False,
        guest_said: str = "",
        output: str = "",
        serial_log: str = "",
    ):
        self.reason = message
        self.exitcode = exitcode
        self.qemu_exited = qemu_exited or exitcode is not None
        self.guest_said = guest_said
        self.output = output
        self.serial_log = serial_log
        text = message
        if exitcode is not None:
            text += f"\n  QEMU exit status: {exitcode}"
        if guest_said:
            text += f"\n  guest kernel: {guest_said}"
        if output.strip():
            text += "\n  qemu output:\n" + _tail(output)
        if serial_log.strip():
            text += "\n  serial log tail:\n" + _tail(serial_log)
        super().__init__(text)

    def again(self) -> VMLost:
        """The same loss as a new exception, for another thread or call to raise (an
        exception object raised twice would carry both tracebacks); its cause is kept."""
        copy = VMLost(self.reason, exitcode=self.exitcode, qemu_exited=self.qemu_exited,
                      guest_said=self.guest_said, output=self.output,
                      serial_log=self.serial_log)
        copy.__cause__ = self.__cause__
        return copy


class GuestCommandError(KprobeVMError):
    """A guest command run with ``check=True`` exited non-zero."""

    def __init__(self, command: str, returncode: int, stdout: str, stderr: str):
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"guest command {command!r} exited with status {returncode}"
            + (f"\n  stderr:\n{_tail(stderr)}" if stderr.strip() else "")
        )


class GuestCommandTimeout(KprobeVMError):
    """A guest command did not finish within its timeout."""

    def __init__(self, command: str, timeout: float):
        self.command = command
        self.timeout = timeout
        super().__init__(f"guest command {command!r} did not finish within {timeout:g} s")


class GdbError(KprobeVMError):
    """The conversation with the gdbstub failed; ``sent`` and ``received`` are raw packets."""

    def __init__(self, message: str, *, sent: bytes | None = None, received: bytes | None = None):
        self.sent = sent
        self.received = received
        text = message
        if sent is not None:
            text += f"\n  sent: {sent[:200]!r}"
        if received is not None:
            text += f"\n  received: {received[:200]!r}"
        super().__init__(text)


class UnknownRegister(GdbError, KeyError):
    """A register the target's description does not name (a ``KeyError`` too, so
    ``layout[name]`` idioms work); the stub's description may lack what we expect."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no register named {name!r} in the target description")

    def __str__(self) -> str:
        return str(self.args[0])


class GdbProtocolError(GdbError):
    """A malformed, oversized or unexpected packet."""


class GdbErrorReply(GdbError):
    """The stub answered ``Exx``; ``code`` is the number."""

    def __init__(self, code: int, *, sent: bytes | None = None, received: bytes | None = None):
        self.code = code
        super().__init__(f"gdbstub error reply E{code:02x}", sent=sent, received=received)


class GdbTimeout(GdbError):
    """No reply arrived in time."""


class GdbConnectionClosed(GdbError):
    """The stub closed the connection."""


LOST_ERRORS: tuple[type[KprobeVMError], ...] = (VMLost, GdbConnectionClosed)
"""The errors after which the guest cannot be reached any more: code that catches a
handler's (or a best-effort step's) failure and goes on must let these through."""


class GuestMemoryError(KprobeVMError):
    """Guest memory could not be read or written."""


class GuestFaultError(GuestMemoryError):
    """``address`` is not mapped; ``reason`` says where the translation stopped."""

    def __init__(self, address: int, reason: str = "not mapped", *, level: int | None = None):
        self.address = address
        self.reason = reason
        self.level = level
        super().__init__(f"guest fault at {address:#x}: {reason}")


class TaskWalkError(GuestMemoryError):
    """The guest's task list could not be walked: ``task`` is where it broke off and
    ``walked`` how many tasks came before."""

    def __init__(self, message: str, *, task: int, walked: int) -> None:
        self.task = task
        self.walked = walked
        super().__init__(f"task list walk: {message} (after {walked} tasks)")


class SymbolError(KprobeVMError):
    """A kernel symbol lookup failed."""


class SymbolNotFound(SymbolError, KeyError):
    """No symbol of that name (a ``KeyError``, so ``symbols.get`` idioms work)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no kernel symbol named {name!r}")

    def __str__(self) -> str:
        return str(self.args[0])


class AmbiguousSymbol(SymbolError):
    """A name several symbols share (static functions); ``addresses`` lists them."""

    def __init__(self, name: str, addresses: list[int]):
        self.name = name
        self.addresses = list(addresses)
        where = ", ".join(f"{a:#x}" for a in self.addresses)
        super().__init__(f"symbol {name!r} is ambiguous: {len(self.addresses)} at {where}")


class VmlinuxError(KprobeVMError):
    """The vmlinux ELF could not be extracted or read."""


class VmlinuxMismatch(VmlinuxError):
    """A vmlinux from another build than the kernel it was given for: its DWARF would
    describe other types and addresses without any error, so it is refused."""

    def __init__(self, message: str, *, vmlinux: str, theirs: str, ours: str):
        self.vmlinux = vmlinux
        self.theirs = theirs
        """What the vmlinux says (build id, else banner)."""
        self.ours = ours
        """What the kernel it was given for says."""
        super().__init__(f"{message}: {vmlinux} has {theirs}, the kernel {ours}")


class KaslrError(KprobeVMError):
    """The kernel's KASLR slide could not be determined."""


class KprobeError(KprobeVMError):
    """A probe could not be placed, armed or removed."""

    def __init__(self, message: str, *, address: int | None = None, symbol: str | None = None):
        self.address = address
        self.symbol = symbol
        where = []
        if symbol:
            where.append(symbol)
        if address is not None:
            where.append(f"{address:#x}")
        super().__init__(message + (f" ({' at '.join(where)})" if where else ""))


class ProbeRefused(KprobeError):
    """A safety check refused the probe; ``code`` is the kernel's name for the reason."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        address: int | None = None,
        symbol: str | None = None,
    ):
        self.code = code
        super().__init__(f"{code}: {message}", address=address, symbol=symbol)


class ProbeTextChanged(KprobeError):
    """Bytes we wrote (or are about to write over) are not what we expect."""

    def __init__(self, address: int, expected: bytes, found: bytes):
        self.expected = expected
        self.found = found
        super().__init__(
            f"guest text changed under us: expected {expected.hex()} found {found.hex()}",
            address=address,
        )


class SlotExhausted(KprobeError):
    """No instruction slot is free, even after garbage collection."""


class NoSlotMemory(KprobeError):
    """No guest memory for slots: no ``memmap=`` reserve, and none the guest kernel keeps
    unused that could be proven so (the message says which check failed)."""


class ProbeSyntaxError(KprobeVMError, ValueError):
    """A kprobe_events definition the kernel rejects; ``code``/``position`` as its error_log."""

    def __init__(self, code: str, position: int, text: str, message: str = ""):
        self.code = code
        self.position = position
        self.text = text
        caret = " " * position + "^"
        detail = f": {message}" if message else ""
        super().__init__(f"{code}{detail}\n  {text}\n  {caret}")


class JournalError(KprobeVMError):
    """The write journal cannot be read or does not match the guest."""

    def __init__(self, message: str, *, path: str = ""):
        self.path = path
        super().__init__(message + (f" (journal: {path})" if path else ""))


class DrgnError(KprobeVMError):
    """``vm.drgn()`` could not make a drgn Program: drgn is missing, the guest kernel
    keeps no VMCOREINFO, or the vmlinux given has no debug info; ``hint`` says what to do."""

    def __init__(self, message: str, *, hint: str) -> None:
        self.hint = hint
        super().__init__(f"{message}; {hint}")
