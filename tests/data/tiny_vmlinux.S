/* Source of tiny_vmlinux.elf: a few kernel-like sections at kernel addresses, with symbols.
 * Rebuild: see make_tiny_vmlinux.sh. */
	.section .text, "ax"
	.globl _text
_text:
	.globl startup_64
	.type startup_64, @function
startup_64:
	lea 0x100(%rip), %rsp
	nop
	nop
	.size startup_64, . - startup_64
	.type do_thing, @function
do_thing:
	push %rbp
	mov %rsp, %rbp
	pop %rbp
	ret
	.size do_thing, . - do_thing
	/* 8 KiB of pseudo-random bytes with sites that boot patches, for KASLR matching. */
	.type filler, @function
filler:
	.set seed, 1
	.rept 2048
	.set seed, (seed * 1103515245 + 12345) & 0x7fffffff
	.byte (seed >> 16) & 0xff
	.endr
alt_site:	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00
ret_site:	jmp do_thing
lock_site:	lock incl (%rax)
para_site:	.byte 0xff, 0x14, 0x25, 0, 0, 0, 0
	.rept 6144
	.set seed, (seed * 1103515245 + 12345) & 0x7fffffff
	.byte (seed >> 16) & 0xff
	.endr
	.size filler, . - filler
	.globl _etext
_etext:
	.section .init.data, "aw"
	/* The _kprobe_blacklist array: NOKPROBE_SYMBOL(do_thing), and a data address the
	 * kernel skips because it is not text. */
	.globl __start_kprobe_blacklist
__start_kprobe_blacklist:
	.quad do_thing
	.quad counter
	.globl __stop_kprobe_blacklist
__stop_kprobe_blacklist:
	.section .altinstructions, "a"
	.long alt_site - .
	.long alt_site - .
	.word 0x1234
	.byte 5, 5
	.section .return_sites, "a"
	.long ret_site - .
	.section .smp_locks, "a"
	.long lock_site - .
	.section .parainstructions, "a"
	.quad para_site
	.byte 1, 7
	.balign 16
	.section .rodata, "a"
	.globl linux_banner
	.type linux_banner, @object
linux_banner:
	.asciz "Linux version tiny\n"
	.size linux_banner, . - linux_banner
	.section .data, "aw"
	.type counter, @object
counter:
	.quad 0x1122334455667788
	.size counter, 8
	.weak weak_fn
	.section .bss, "aw", @nobits
	.globl zeroed
zeroed:
	.zero 64
	.section .data..percpu, "aw"
	.globl current_task
current_task:
	.quad 0
