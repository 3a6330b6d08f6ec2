"""The kernel's names and messages for rejected probe definitions (6.1's ``ERRORS`` list).

``trace_probe_log_err(offset, CODE)`` in the kernel writes ``CODE``'s message into
tracefs ``error_log`` with a caret under the failing byte; :func:`probe_error` builds the
same fact as a :class:`~kprobevm.errors.ProbeSyntaxError`, and :class:`ProbeLog` keeps
the word the kernel counts the offset from, as its ``trace_probe_log`` does.
"""

from __future__ import annotations

from typing import NoReturn

from kprobevm.errors import ProbeSyntaxError
from kprobevm.tracing.kernel_text import from_kernel_text

__all__ = ["ERROR_MESSAGES", "UNLOGGED", "ProbeLog", "probe_error", "word_position"]

# Messages as the Debian 6.1.192 guest kernel carries them (kernel/trace/trace_probe.h;
# checked against the strings in its vmlinux). 6.1 calls the maxactive-on-kprobe error
# MAXACT_NO_KPROBE; later kernels renamed it BAD_MAXACT_TYPE.
ERROR_MESSAGES: dict[str, str] = {
    "MAXACT_NO_KPROBE": "Maxactive is not for kprobe",
    "BAD_MAXACT": "Invalid maxactive number",
    "MAXACT_TOO_BIG": "Maxactive is too big",
    "BAD_PROBE_ADDR": "Invalid probed address or symbol",
    "NON_UNIQ_SYMBOL": "The symbol is not unique",
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "BAD_ADDR_SUFFIX": "Invalid probed address suffix",
    "NO_GROUP_NAME": "Group name is not specified",
    "GROUP_TOO_LONG": "Group name is too long",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "NO_EVENT_NAME": "Event name is not specified",
    "EVENT_TOO_LONG": "Event name is too long",
    "BAD_EVENT_NAME": "Event name must follow the same rules as C identifiers",
    "EVENT_EXIST": "Given group/event name is already used by another event",
    "RETVAL_ON_PROBE": "$retval is not available on probe",
    "BAD_STACK_NUM": "Invalid stack number",
    "BAD_ARG_NUM": "Invalid argument number",
    "BAD_VAR": "Invalid $-variable specified",
    "BAD_REG_NAME": "Invalid register name",
    "BAD_MEM_ADDR": "Invalid memory address",
    "BAD_IMM": "Invalid immediate value",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "FILE_ON_KPROBE": "File offset is not available with kprobe",
    "BAD_FILE_OFFS": "Invalid file offset value",
    "SYM_ON_UPROBE": "Symbol is not available with uprobe",
    "TOO_MANY_OPS": "Dereference is too much nested",
    "DEREF_NEED_BRACE": "Dereference needs a brace",
    "BAD_DEREF_OFFS": "Invalid dereference offset",
    "DEREF_OPEN_BRACE": "Dereference brace is not closed",
    "COMM_CANT_DEREF": "$comm can not be dereferenced",
    "BAD_FETCH_ARG": "Invalid fetch argument",
    "ARRAY_NO_CLOSE": "Array is not closed",
    "BAD_ARRAY_SUFFIX": "Array has wrong suffix",
    "BAD_ARRAY_NUM": "Invalid array size",
    "ARRAY_TOO_BIG": "Array number is too big",
    "BAD_TYPE": "Unknown type is specified",
    "BAD_STRING": "String accepts only memory argument",
    "BAD_SYMSTRING": "Symbol String doesn't accept data/userdata",
    "BAD_BITFIELD": "Invalid bitfield",
    "ARG_NAME_TOO_LONG": "Argument name is too long",
    "NO_ARG_NAME": "Argument name is not specified",
    "BAD_ARG_NAME": "Argument name must follow the same rules as C identifiers",
    "USED_ARG_NAME": "This argument name is already used",
    "ARG_TOO_LONG": "Argument expression is too long",
    "NO_ARG_BODY": "No argument expression",
    "BAD_INSN_BNDRY": "Probe point is not an instruction boundary",
    "FAIL_REG_PROBE": "Failed to register probe event",
    "DIFF_PROBE_TYPE": "Probe type is different from existing probe",
    "DIFF_ARG_TYPE": "Argument type or name is different from existing probe",
    "SAME_PROBE": "There is already the exact same probe event",
    "EVENT_TOO_BIG": "Event too big (too many fields?)",
    # Later kernels' errors (the btf_args rule), as the Debian 6.12.118 kernel has them.
    "NOSUP_BTFARG": "BTF is not available or not supported",
    "NO_BTF_ENTRY": "No BTF entry for this probe point",
    "NO_BTFARG": "This variable is not found at this probe point",
    "NO_RETVAL": "This function returns 'void' type",
    "BAD_TYPE4STR": "This type does not fit for string.",
    "NOFENTRY_ARGS": "$arg* can be used only on function entry or exit",
    "DOUBLE_ARGS": "$arg* can be used only once in the parameters",
    # Rejections 6.1 makes with -EINVAL but no error_log line. The names are ours
    # (NEED_STRING_TYPE is the name kernels after 6.1 gave the same check).
    "EINVAL": "Invalid argument (the kernel logs no error for this)",
    "NEED_STRING_TYPE": "$comm and immediate-string only accepts string type",
    # A definition the guest kernel takes and kprobevm cannot place yet (our own code).
    "UNSUPPORTED": "kprobevm does not support this yet",
}

UNLOGGED = frozenset({"EINVAL", "NEED_STRING_TYPE", "UNSUPPORTED"})
"""Codes for rejections the 6.1 kernel makes without writing ``error_log`` (and ours)."""


def probe_error(code: str, position: int, command: str, detail: str = "") -> ProbeSyntaxError:
    """The error ``trace_probe_log_err`` would log: ``code`` with its caret at ``position``."""
    message = ERROR_MESSAGES[code]
    if detail:
        message = f"{message} ({detail})"
    return ProbeSyntaxError(code, position, command, message)


def word_position(command: str, index: int) -> int:
    """The column of word ``index`` of ``command``: where ``trace_probe_log_set_index``
    puts the caret (0 when the index is past the last word, as the kernel's loop leaves it)."""
    words = command.split(" ")
    if index >= len(words):
        return 0
    return sum(len(w) + 1 for w in words[:index])


class ProbeLog:
    """trace_probe_log: the command's words (kernel text) and the word errors count from."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.index = 0
        self.command = " ".join(argv)

    def fail(self, code: str, offset: int, detail: str = "") -> NoReturn:
        """Raise ``code`` with its caret ``offset`` bytes into the current word (past the
        command's end when the index is past the last word, as the kernel puts it)."""
        if self.index >= len(self.argv):
            position = len(self.command) + 1
        else:
            position = word_position(self.command, self.index) + offset
        raise probe_error(code, position, from_kernel_text(self.command), detail)
