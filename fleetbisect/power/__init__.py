"""Out-of-band power control of a bare-metal box, one module per kind behind power/base.py,
chosen by the inventory's `power: {kind: ...}` (the valid kinds are listed when it is wrong)."""

from __future__ import annotations

from ..errors import UserError
from .base import Power, PowerAuthError, PowerError, PowerUnsupported
from .command import CommandPower
from .ipmi import Ipmi
from .redfish import Redfish

KINDS: dict[str, type[Power]] = {cls.kind: cls for cls in (Ipmi, Redfish, CommandPower)}


def config_models() -> tuple[type, ...]:
    return tuple(cls.Config for cls in KINDS.values())


def for_config(config) -> Power:
    try:
        return KINDS[config.kind](config)
    except KeyError:
        raise UserError(f"unknown power kind {config.kind!r} (valid: {', '.join(sorted(KINDS))})") from None


__all__ = ["KINDS", "Power", "PowerAuthError", "PowerError", "PowerUnsupported", "config_models", "for_config"]
