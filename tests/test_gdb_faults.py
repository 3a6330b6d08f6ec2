"""Bad input at the transport: every call returns or raises a KprobeVMError in time, the
client's buffers stay bounded, and after a fault it can recover from, the next request
still pairs with its own reply."""

from __future__ import annotations

import time

import pytest

from kprobevm.errors import GdbProtocolError, KprobeVMError, UnknownRegister
from kprobevm.gdbstub import packet as codec
from kprobevm.gdbstub.packet import PacketReader
from kprobevm.gdbstub.regs import RegisterLayout
from tests.fakestub import CORE_XML, frame

# -- the codec --------------------------------------------------------------------------------


def test_a_packet_trickling_in_is_not_searched_again_from_its_start() -> None:
    """A 200 kB reply fed a byte at a time: linear, not quadratic (minutes before)."""
    body = b"ab" * 100_000
    data = frame(body)
    reader = PacketReader(1 << 20)
    t0 = time.perf_counter()
    events = []
    for i in range(len(data)):
        events += reader.feed(data[i:i + 1])
    assert time.perf_counter() - t0 < 3.0
    assert [ev.payload for ev in events] == [body]  # type: ignore[union-attr]


def test_a_packet_cut_short_by_another_is_counted() -> None:
    reader = PacketReader()
    events = reader.feed(b"$QCp01" + frame(b"OK"))
    assert [ev.payload for ev in events] == [b"OK"]  # type: ignore[union-attr]
    assert reader.truncated == 1
    events = reader.feed(b"$QC")
    events += reader.feed(b"p0")
    events += reader.feed(b"$OK#9a")
    assert reader.truncated == 2 and len(events) == 1


def test_long_stop_replies_are_not_cached() -> None:
    """The stop-reply cache holds 1024 entries: each must stay small."""
    long = b"T05thread:p01.01;" + b"06:%s;" % (b"0" * 400)
    before = codec.parse_short_stop_reply.cache_info().currsize
    assert codec.parse_stop_reply(long).get("06") == "0" * 400
    assert codec.parse_short_stop_reply.cache_info().currsize == before
    assert codec.parse_stop_reply(b"T05thread:p01.01;").thread == "p01.01"


def test_a_thread_id_past_its_length_is_a_protocol_error() -> None:
    with pytest.raises(GdbProtocolError):
        codec.parse_thread_id("p" + "1" * 1000)
    with pytest.raises(GdbProtocolError):
        codec.parse_stop_reply(b"T05thread:p" + b"1" * 100 + b";")


@pytest.mark.parametrize("xml", [
    CORE_XML.replace('bitsize="64"', 'bitsize="-8"', 1),
    CORE_XML.replace('bitsize="64"', 'bitsize="99999999999999999999"', 1),
    CORE_XML.replace('regnum="0"', 'regnum="-1"', 1),
    '<?xml version="1.0" encoding="foo"?>' + CORE_XML.split("?>", 1)[1],
], ids=["negative-bits", "huge-bits", "negative-regnum", "unknown-encoding"])
def test_odd_target_descriptions_are_protocol_errors(xml: str) -> None:
    """These raised struct.error and LookupError before."""
    with pytest.raises(GdbProtocolError):
        RegisterLayout.from_target_xml(xml.encode())


def test_a_register_the_description_lacks_is_an_error_of_the_tree() -> None:
    """A bare KeyError escaped read_register when a stub's description had no rip."""
    layout = RegisterLayout.from_target_xml(CORE_XML.replace('name="rip"', 'name="pc"'))
    with pytest.raises(UnknownRegister) as exc:
        layout["rip"]
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, KprobeVMError)
    assert "rip" in str(exc.value)
