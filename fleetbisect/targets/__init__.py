"""Targets: what boots the kernel under test, one module per kind behind one interface
(targets/base.py). Each module has one Target class with its inventory model as `Config`; the
inventory's `target:` is the union of those models, chosen by `kind`, and `select` finds the
class for a kind, naming the valid kinds when the name is wrong."""

from __future__ import annotations

from ..errors import UserError
from .baremetal import Baremetal
from .base import Check, Target, TargetStartFailed
from .libvirt import Libvirt
from .qemu import Qemu

KINDS: dict[str, type[Target]] = {cls.kind: cls for cls in (Qemu, Libvirt, Baremetal)}


def config_models() -> tuple[type, ...]:
    """The inventory models of every kind, for the inventory's `target:` union."""
    return tuple(cls.Config for cls in KINDS.values())


def select(kind: str) -> type[Target]:
    try:
        return KINDS[kind]
    except KeyError:
        raise UserError(f"unknown target kind {kind!r} (valid: {', '.join(sorted(KINDS))})") from None


def for_host(host_cfg, playbook) -> Target:
    """The target of an inventory host, for this playbook."""
    return select(host_cfg.target.kind)(host_cfg, playbook)


__all__ = ["Check", "KINDS", "Target", "TargetStartFailed", "config_models", "for_host", "select"]
