"""The guest as a machine: its image, QEMU's launch, the SSH shell, and the VM facade
that composes every engine object and hands each what it uses."""
