"""How a probe's int3 reaches the host and how the guest goes on: the trap channels."""
