#!/bin/sh
# Rebuild tests/data/tiny_vmlinux.elf (a 3 KB stand-in for vmlinux, with .symtab).
set -e
cd "$(dirname "$0")"
as --64 -o /tmp/tiny_vmlinux.o tiny_vmlinux.S
ld -m elf_x86_64 -T tiny_vmlinux.lds -z max-page-size=4096 -o tiny_vmlinux.elf /tmp/tiny_vmlinux.o
objcopy --strip-all tiny_vmlinux.elf tiny_vmlinux_nosyms.elf
