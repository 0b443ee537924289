"""The inventory model of `target: {kind: baremetal}`: the host itself boots the kernel under
test. How it boots a candidate once (`oneshot`), how it is power cycled when it does not come
back (`power`, see fleetbisect/power/), where its console is read (`console`), and which
kernel it must be running when it is back on its known-good default (`default_release`).

    target:
      kind: baremetal
      default_release: 6.1.0-21-amd64          # what verify.command prints on the default kernel
      oneshot: {method: grub}                   # or kexec (the fast path), or command: [...]
      power: {kind: ipmi, address: bmc1.lab, user: admin, password_env: BMC1_PASSWORD}
      console: {kind: pstore}                   # or file: a serial log on this machine
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..power import config_models as power_models
from .loader import Int, Seconds, Strict, by_kind
from .target import Guest, TargetConfig

PLACEHOLDERS = ("{kernel}", "{initrd}", "{cmdline}", "{release}")


class Oneshot(Strict):
    """How the box boots a candidate ONCE, so that its next power cycle brings back the
    permanent default (which fleetbisect never changes).

    - kexec: `kexec -l` the installed kernel, then `kexec -e` (no firmware, fastest).
    - grub: `update-grub`, then `grub-reboot ENTRY` (the entry's id in grub.cfg), then reboot.
      grub-reboot needs GRUB_DEFAULT=saved (`check` says so when it is not).
    - command: an argv run on the box that boots the candidate once and reboots; its words may
      hold {kernel} {initrd} {cmdline} {release}.
    """

    method: Literal["kexec", "grub", "command"] = "kexec"
    command: list[str] | None = None
    grub_reboot: str = "grub-reboot"  # grub2-reboot on Fedora/RHEL
    grub_cfg: str = "/boot/grub/grub.cfg"  # /boot/grub2/grub.cfg on Fedora/RHEL
    update_grub: list[str] = Field(default_factory=lambda: ["update-grub"])  # grub2-mkconfig -o ...
    reboot: list[str] = Field(default_factory=lambda: ["reboot"], min_length=1,
                              description="a plain reboot into the default entry (after grub-reboot; restore)")

    @model_validator(mode="after")
    def _command(self):
        if self.method == "command" and not self.command:
            raise ValueError("method: command needs `command:` (an argv list run on the box)")
        if self.method != "command" and self.command:
            raise ValueError(f"`command:` is for method: command, not {self.method}")
        return self


class Console(Strict):
    """Where the box's console is read after a step: `file` (a serial log this machine writes,
    e.g. conserver's or the lab's), `pstore` (/sys/fs/pstore on the box, read after the reboot,
    where ramoops/EFI keep the last kernel's dying words), or `none`."""

    kind: Literal["none", "file", "pstore"] = "none"
    path: str | None = None

    @model_validator(mode="after")
    def _path(self):
        if (self.kind == "file") != (self.path is not None):
            raise ValueError("console.path is required with kind: file, and only then")
        return self


class Deadlines(Strict):
    """How long each wait of a bare-metal step may take."""

    down: Seconds = Field(60.0, description="the box stops answering after the reboot was asked")
    answer: Seconds = Field(15.0, description="a box that should be up answers SSH, else it is recovered")
    nmi: Seconds = Field(10.0, description="after an NMI, time for the kernel to print its backtrace")
    recover: Seconds = Field(300.0, description="power cycle -> the default kernel answers SSH")


class BaremetalConfig(TargetConfig):
    """`target: {kind: baremetal, ...}`: see the module's docstring."""

    kind: Literal["baremetal"]
    guest: Guest | None = None  # the box is the host: it is reached by the host's ssh settings
    default_release: str = Field(min_length=1, description="what verify.command prints on the default kernel")
    power: by_kind(*power_models())
    oneshot: Oneshot = Field(default_factory=Oneshot)
    console: Console = Field(default_factory=Console)
    deadlines: Deadlines = Field(default_factory=Deadlines)
    boot_dir: str = "/boot"
    recoveries: int = Int(1, 10, 3)  # failed recoveries in a row that stop the run

    @field_validator("boot_dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._/+-]*", v):
            raise ValueError(f"{v!r} is not an absolute path on the box")
        return v

    @model_validator(mode="after")
    def _nothing_for_vms(self):
        if self.guest is not None or self.pci or self.virtiofs is not None:
            raise ValueError("a bare-metal box is its own guest: no guest, pci or virtiofs")
        return self
