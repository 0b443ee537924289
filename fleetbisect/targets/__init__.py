"""Targets: what boots the kernel under test (a VM on a host, or the host itself)."""
