"""KernelSymbols: parsing /proc/kallsyms, sizes, %pS descriptions, duplicates, modules."""

from __future__ import annotations

import random

import pytest

from kprobevm.errors import AmbiguousSymbol, SymbolError, SymbolNotFound
from kprobevm.kernel.kallsyms import KernelSymbols, Symbol

# A slice shaped like a 6.1 kallsyms: per-CPU offsets first, aliases (_text/startup_64),
# a static function twice (ambiguous), weak text, data, and two modules at the end.
KALLSYMS = """\
0000000000000000 A fixed_percpu_data
0000000000001000 A cpu_debug_store
000000000001fb80 D current_task
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000070 T secondary_startup_64
ffffffff813a0000 t show_map
ffffffff813a0100 W arch_thing
ffffffff813b1230 T do_sys_openat2
ffffffff813b13a0 t show_map
ffffffff813b1400 T do_sys_open
ffffffff82000000 D linux_banner
ffffffff82000100 d saved_command_line
ffffffff83000000 B _end
ffffffffc0200000 t virtio_init\t[virtio]
ffffffffc0200040 t virtio_exit\t[virtio]
ffffffffc0201000 d virtio_data\t[virtio]
ffffffffc0300000 t net_rx\t[virtio_net]
ffffffffc0300020 t net_rx.cold\t[virtio_net]
"""


@pytest.fixture
def syms() -> KernelSymbols:
    return KernelSymbols.from_text(KALLSYMS)


def test_name_to_address(syms: KernelSymbols) -> None:
    assert syms["do_sys_openat2"] == 0xFFFFFFFF813B1230
    assert syms["virtio_exit"] == 0xFFFFFFFFC0200040
    assert "do_sys_open" in syms
    assert "nope" not in syms
    assert syms.get("nope") is None
    assert syms.get("nope", 7) == 7
    assert len(syms) == KALLSYMS.count("\n")


def test_missing_symbol_is_a_key_error(syms: KernelSymbols) -> None:
    with pytest.raises(KeyError):
        syms["no_such_function"]
    with pytest.raises(SymbolNotFound, match="no_such_function"):
        syms.size("no_such_function")


def test_duplicate_static_function_is_ambiguous(syms: KernelSymbols) -> None:
    with pytest.raises(AmbiguousSymbol) as info:
        syms["show_map"]
    assert info.value.addresses == [0xFFFFFFFF813A0000, 0xFFFFFFFF813B13A0]
    assert [s.address for s in syms.all("show_map")] == info.value.addresses
    with pytest.raises(AmbiguousSymbol):
        syms.get("show_map")


def test_sizes_go_to_the_next_higher_address(syms: KernelSymbols) -> None:
    assert syms.size("do_sys_openat2") == 0x170
    # Aliases share an address: each one's size runs to the next *higher* address.
    assert syms.size("_text") == syms.size("startup_64") == syms.size("_stext") == 0x70
    # The last symbol of the core kernel has nothing after it.
    assert syms.size("_end") == 0
    # Module symbols end within their module, never at the next module's first symbol.
    assert syms.size("virtio_exit") == 0xFC0
    # The last symbol of a module ends at its page boundary (module memory is whole pages).
    assert syms.size("virtio_data") == 0x1000
    assert syms.size("net_rx.cold") == 0xFE0
    # Per-CPU offsets are their own area, not sized against kernel text.
    assert syms.size("cpu_debug_store") == 0x1FB80 - 0x1000


def test_describe_is_the_kernels_percent_ps(syms: KernelSymbols) -> None:
    assert syms.describe(0xFFFFFFFF813B1234) == "do_sys_openat2+0x4/0x170"
    assert syms.describe(0xFFFFFFFF813B1230) == "do_sys_openat2+0x0/0x170"
    # %pS names the first alias kallsyms lists at an address.
    assert syms.describe(0xFFFFFFFF81000010) == "_stext+0x10/0x70"
    assert syms.describe(0xFFFFFFFFC0200044) == "virtio_exit+0x4/0xfc0 [virtio]"
    assert syms.describe(0xFFFFFFFFC0300021) == "net_rx.cold+0x1/0xfe0 [virtio_net]"
    assert syms.describe(0xFFFFFFFF80000000) == "0xffffffff80000000"


def test_lookup_returns_the_containing_symbol(syms: KernelSymbols) -> None:
    sym = syms.lookup(0xFFFFFFFF813B1300)
    assert sym == Symbol("do_sys_openat2", 0xFFFFFFFF813B1230, 0x170, "T", None)
    assert sym.is_text and sym.end == 0xFFFFFFFF813B13A0
    assert syms.lookup(0xFFFFFFFF80000000) is None  # below every kernel symbol
    assert syms.lookup(0xFFFFFFFFC0202000) is None  # past the last page of virtio
    mod = syms.lookup(0xFFFFFFFFC0200000)
    assert mod is not None and mod.module == "virtio"


def test_functions_are_text_symbols(syms: KernelSymbols) -> None:
    names = [s.name for s in syms.functions()]
    assert "do_sys_openat2" in names and "arch_thing" in names
    assert "linux_banner" not in names and "virtio_init" not in names
    assert [s.name for s in syms.functions("virtio")] == ["virtio_init", "virtio_exit"]
    assert syms.modules() == {"virtio", "virtio_net"}


def test_slid_moves_kernel_symbols_only(syms: KernelSymbols) -> None:
    moved = syms.slid(0x1E00000)
    assert moved["do_sys_openat2"] == syms["do_sys_openat2"] + 0x1E00000
    assert moved["virtio_init"] == syms["virtio_init"]
    assert moved["current_task"] == syms["current_task"]
    assert moved.describe(moved["do_sys_openat2"] + 4) == "do_sys_openat2+0x4/0x170"


def test_unsorted_input_is_sorted(syms: KernelSymbols) -> None:
    lines = KALLSYMS.splitlines()
    random.Random(1).shuffle(lines)
    shuffled = KernelSymbols.from_text("\n".join(lines))
    assert shuffled.describe(0xFFFFFFFF813B1234) == "do_sys_openat2+0x4/0x170"
    assert shuffled.size("virtio_exit") == 0xFC0


def test_hidden_addresses_are_reported() -> None:
    text = "0000000000000000 T _text\n0000000000000000 T do_sys_openat2\n"
    with pytest.raises(SymbolError, match="kptr_restrict"):
        KernelSymbols.from_text(text)


@pytest.mark.parametrize(
    "line",
    ["ffffffff81000000 T", "zzzz T foo", "ffffffff81000000 T foo mod", "ffffffff81000000 T a b c"],
)
def test_malformed_lines_are_refused(line: str) -> None:
    with pytest.raises(SymbolError, match="line 2"):
        KernelSymbols.from_text("ffffffff81000000 T _text\n" + line + "\n")


def test_a_large_kallsyms_with_modules() -> None:
    """155,000 core symbols and 3,000 module ones (a 6.12-sized file); its parse time is
    measured by scripts/bench-symbols, not here: wall and CPU time depend on neighbours."""
    rng = random.Random(2)
    addr = 0xFFFFFFFF81000000
    lines = []
    for i in range(155_000):
        lines.append(f"{addr:016x} {'Tt'[i % 2]} sym_{i % 150_000}")
        addr += rng.randint(0, 300)
    lines += [f"{0xFFFFFFFFC0000000 + 32 * i:016x} t m_{i}\t[mod{i // 100}]" for i in range(3000)]
    syms = KernelSymbols.from_text("\n".join(lines) + "\n")
    assert len(syms) == 158_000
    last = syms.lookup(0xFFFFFFFFC0000000 + 32 * 2999 + 1)
    assert last is not None and last.module == "mod29"


def test_module_colon_symbol_names_a_modules_symbol(syms: KernelSymbols) -> None:
    assert syms["virtio_net:net_rx"] == syms["net_rx"] == 0xFFFFFFFFC0300000
    assert syms["virtio_net:net_rx.cold"] == 0xFFFFFFFFC0300020
    assert "virtio:virtio_init" in syms and "virtio_net:virtio_init" not in syms
    assert syms.symbol("virtio:virtio_exit").module == "virtio"
    with pytest.raises(SymbolNotFound):
        syms["virtio:net_rx"]  # the symbol exists, but not in that module
    with pytest.raises(SymbolNotFound):
        syms["not_loaded:net_rx"]


def test_a_module_gone_and_a_fresh_read_replace_the_table_in_place(syms: KernelSymbols) -> None:
    before = len(syms)
    syms.replace_with(syms.without_module("virtio_net"))
    assert "net_rx" not in syms and syms.lookup(0xFFFFFFFFC0300000) is None
    assert len(syms) == before - 2 and syms["virtio:virtio_init"] == 0xFFFFFFFFC0200000
    syms.replace_with(KernelSymbols.from_text(KALLSYMS))
    assert syms["virtio_net:net_rx"] == 0xFFFFFFFFC0300000
