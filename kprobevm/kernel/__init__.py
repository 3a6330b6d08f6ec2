"""What the host knows of the guest kernel: symbols, the vmlinux image and its BTF,
``current`` and its task fields, the KASLR slide, the kprobe blacklist and the text the
kernel rewrites at run time."""
