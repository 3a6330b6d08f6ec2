"""Hot-site promotion: a mailbox byte and a watchpoint of its own for a busy probe.

Every site's pre store first writes the shared mailbox byte 0, so a stop there must read
RIP to learn which site it was. After ``PROMOTE_AFTER`` such hits a site gets a byte of
its own with its own watchpoint: its stop then names it, and a hit costs one stop and
one continue. Only hot sites: QEMU looks through every watchpoint at each TLB fill, and
1,000 watchpoints cost an idle guest about 30% of its speed (100 cost nothing
measurable). Bytes are handed out round robin, so one comes back into use only after
all the others: a stale report of its previous owner has been seen by then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kprobevm.gdbstub.client import BreakpointKind

if TYPE_CHECKING:
    from kprobevm.gdbstub.target import Target
    from kprobevm.kprobes.core import ProbeSite

__all__ = ["MAILBOX_BYTES", "PROMOTE_AFTER", "RETURN_WATCH", "SITE_WATCHES", "HotSites"]

MAILBOX_BYTES = 4096
"""The mailbox page: byte 0 takes the pre and post stores of most sites, byte
``RETURN_WATCH`` the kretprobe trampoline's, the others belong to hot sites."""
RETURN_WATCH = 1
VANISHED = MAILBOX_BYTES - 8
"""A u64 the #BP stub counts the int3s it found gone in (unwatched, far from the rest)."""
SITE_WATCHES = 64
"""Hot sites with a watchpoint of their own, at most."""
PROMOTE_AFTER = 8
"""Hits through the shared byte before a site gets its own."""
_FIRST = RETURN_WATCH + 1
_SPAN = MAILBOX_BYTES - _FIRST


class HotSites:
    """The mailbox bytes handed to hot sites and the shared-byte hit counts."""

    def __init__(self, target: Target, mailbox: int) -> None:
        self.target = target
        self.mailbox = mailbox
        self.sites: dict[int, ProbeSite] = {}
        """Mailbox byte address -> the hot site whose pre store writes it."""
        self._shared_hits: dict[int, int] = {}
        self._next = 0

    def site_of(self, watch: int) -> ProbeSite | None:
        """The hot site a watchpoint stop at ``watch`` names."""
        return self.sites.get(watch)

    def shared_hit(self, site: ProbeSite) -> bool:
        """Count a hit of ``site`` through byte 0; True when it is time to promote it."""
        hits = self._shared_hits.get(site.addr, 0) + 1
        self._shared_hits[site.addr] = hits
        return hits >= PROMOTE_AFTER

    def watch(self, site: ProbeSite) -> bool:
        """Give ``site`` a byte and a watchpoint of its own; False when it cannot have one.

        Sites with a post store stay on byte 0: their old slot's post stop must still be
        found by its RIP. The caller moves the site to a slot that stores to the byte.
        """
        self._shared_hits.pop(site.addr, None)
        if site.wants_post or len(self.sites) >= SITE_WATCHES:
            return False
        for _ in range(_SPAN):
            addr = self.mailbox + _FIRST + self._next
            self._next = (self._next + 1) % _SPAN
            if addr not in self.sites:
                break
        self.target.client.insert_breakpoint(BreakpointKind.WRITE_WATCH, addr, 1)
        self.sites[addr] = site
        site.pre_watch = addr
        return True

    def forget(self, site: ProbeSite) -> None:
        """The site is gone: its counts and its watchpoint go too (VM stopped)."""
        self._shared_hits.pop(site.addr, None)
        if site.pre_watch is not None:
            self.target.client.remove_breakpoint(BreakpointKind.WRITE_WATCH, site.pre_watch, 1)
            del self.sites[site.pre_watch]
            site.pre_watch = None

    def forget_all(self) -> None:
        """Every hot site's watchpoint out (VM stopped)."""
        for site in list(self.sites.values()):
            self.forget(site)
