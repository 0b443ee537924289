"""A fake sysfs tree for the passthrough scripts, with a fake kernel behind its write-only files.

The tree has what the scripts read: bus/pci/devices/ADDR links to device directories holding
`class`, `vendor`, `device`, an `iommu_group` link and a `driver` link; kernel/iommu_groups/N/
devices/ADDR links; class/block and class/net links to block devices and interfaces under
their PCI device (or under devices/virtual for dm and bridges); `holders/` and `lower_*` links.

The files the scripts write (`driver_override`, drivers/X/`bind` and `unbind`, `drivers_probe`)
are FIFOs read by a thread playing the kernel: each line written is one write(2) to sysfs, and
it changes the tree as Linux would (unbind drops the `driver` link, drivers_probe binds the
override or the device's own driver, bind binds if the override allows). Every write is kept
in `writes` in the order it was acted on. `settle()` returns once every write made so far was
acted on; `snapshot()` is the whole tree (links, files, FIFOs) plus the overrides.
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass
from pathlib import Path

DRIVERS = ("e1000e", "nvme", "ahci", "xhci_hcd", "pcieport", "snd_hda_intel", "iwlwifi", "vfio-pci")


@dataclass
class Dev:
    address: str
    pci_class: str  # "0x020000"
    driver: str | None
    group: int
    ids: tuple[str, str] = ("0x8086", "0x1234")


class FakeSysfs:
    def __init__(self, root: Path, devices: list[Dev], *, drivers=DRIVERS):
        self.root = root
        self.devices = {d.address: d for d in devices}
        self.native = {d.address: d.driver for d in devices}
        self.overrides: dict[str, str | None] = {d.address: None for d in devices}
        self.refuse_vfio: set[str] = set()
        self.writes: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._fifos: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._syncs_asked = 0
        self._syncs_done = 0
        self._thread: threading.Thread | None = None
        pci = root / "bus" / "pci"
        for drv in drivers:
            (pci / "drivers" / drv).mkdir(parents=True)
            for name in ("bind", "unbind"):
                os.mkfifo(pci / "drivers" / drv / name)
        os.mkfifo(pci / "drivers_probe")
        (pci / "devices").mkdir(parents=True)
        for d in devices:
            path = self.dev_dir(d.address)
            path.mkdir(parents=True)
            (path / "class").write_text(d.pci_class + "\n")
            (path / "vendor").write_text(d.ids[0] + "\n")
            (path / "device").write_text(d.ids[1] + "\n")
            os.mkfifo(path / "driver_override")
            group = root / "kernel" / "iommu_groups" / str(d.group)
            (group / "devices").mkdir(parents=True, exist_ok=True)
            os.symlink(group, path / "iommu_group")
            os.symlink(path, group / "devices" / d.address)
            os.symlink(path, pci / "devices" / d.address)
            if d.driver:
                os.symlink(pci / "drivers" / d.driver, path / "driver")
        (root / "class" / "block").mkdir(parents=True)
        (root / "class" / "net").mkdir(parents=True)

    def dev_dir(self, address: str) -> Path:
        return self.root / "devices" / "pci0000:00" / address

    # --- what hangs under devices -----------------------------------------------------------

    def add_disk(self, address: str, disk: str, partitions: list[str]) -> None:
        ctrl = self.dev_dir(address) / "nvme" / "nvme0" if disk.startswith("nvme") else \
            self.dev_dir(address) / "ata1" / "host0" / "target0:0:0" / "0:0:0:0" / "block"
        base = ctrl / disk
        base.mkdir(parents=True)
        (base / "holders").mkdir()
        os.symlink(base, self.root / "class" / "block" / disk)
        for p in partitions:
            (base / p / "holders").mkdir(parents=True)
            os.symlink(base / p, self.root / "class" / "block" / p)

    def add_dm(self, name: str, dm_name: str, on: str) -> None:
        path = self.root / "devices" / "virtual" / "block" / name
        (path / "dm").mkdir(parents=True)
        (path / "holders").mkdir()
        (path / "dm" / "name").write_text(dm_name + "\n")
        os.symlink(path, self.root / "class" / "block" / name)
        os.symlink(path, self.root / "class" / "block" / on / "holders" / name)

    def add_nic(self, address: str, ifname: str) -> None:
        path = self.dev_dir(address) / "net" / ifname
        path.mkdir(parents=True)
        os.symlink(self.dev_dir(address), path / "device")
        os.symlink(path, self.root / "class" / "net" / ifname)

    def add_bridge(self, ifname: str, ports: list[str]) -> None:
        path = self.root / "devices" / "virtual" / "net" / ifname
        path.mkdir(parents=True)
        for p in ports:
            os.symlink(os.path.realpath(self.root / "class" / "net" / p), path / f"lower_{p}")
        os.symlink(path, self.root / "class" / "net" / ifname)

    # --- the kernel -------------------------------------------------------------------------

    def driver_of(self, address: str) -> str | None:
        link = self.dev_dir(address) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def _bind(self, address: str, driver: str) -> None:
        os.symlink(self.root / "bus" / "pci" / "drivers" / driver, self.dev_dir(address) / "driver")

    def _act(self, path: Path, value: str) -> None:
        rel = str(path.relative_to(self.root))
        self.writes.append((rel, value))
        parts = path.parts
        if path.name == "driver_override":
            self.overrides[parts[-2]] = value or None
        elif path.name == "unbind":
            if self.driver_of(value) == parts[-2]:
                os.unlink(self.dev_dir(value) / "driver")
            else:
                self.errors.append(f"unbind {value} from {parts[-2]}: not bound to it")
        elif path.name == "bind":
            drv = parts[-2]
            if self.driver_of(value) is None and self.overrides[value] in (None, drv):
                self._bind(value, drv)
            else:
                self.errors.append(f"bind {value} to {drv}: refused")
        elif path.name == "drivers_probe":
            if self.driver_of(value) is None:
                drv = self.overrides[value] or self.native[value]
                if drv and not (drv == "vfio-pci" and value in self.refuse_vfio):
                    self._bind(value, drv)

    _ORDER = {"driver_override": 0, "unbind": 1, "bind": 2, "drivers_probe": 2}

    def _serve(self, control: int) -> None:
        poller = select.poll()
        poller.register(control, select.POLLIN)
        for fd in self._fifos:
            poller.register(fd, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll()]
            batch = []
            for fd in ready:
                if fd == control:
                    continue
                data = b""
                while True:
                    try:
                        chunk = os.read(fd, 4096)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    data += chunk
                path = self._fifos[fd]
                for line in data.decode().split("\n")[:-1]:
                    batch.append((self._ORDER[path.name], path, line.strip()))
            # Writes that arrived together were made in this order by every script.
            for _, path, value in sorted(batch, key=lambda b: b[0]):
                self._act(path, value)
            if control in ready:
                msg = os.read(control, 4096)
                with self._lock:
                    self._syncs_done += msg.count(b"s")
                    self._settled.notify_all()
                if b"q" in msg:
                    return

    def start(self) -> "FakeSysfs":
        for fifo in self.root.rglob("*"):
            if fifo.is_fifo():
                self._fifos[os.open(fifo, os.O_RDWR | os.O_NONBLOCK)] = fifo
        self._control_r, self._control_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, args=(self._control_r,), daemon=True)
        self._thread.start()
        return self

    def settle(self) -> None:
        """Return once everything written so far was acted on."""
        with self._lock:
            self._syncs_asked += 1
            want = self._syncs_asked
        os.write(self._control_w, b"s")
        with self._lock:
            while not self._settled.wait_for(lambda: self._syncs_done >= want, timeout=1):
                assert self._thread is not None and self._thread.is_alive(), "the fake kernel died"

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._control_w, b"q")
            self._thread.join()
            for fd in (*self._fifos, self._control_r, self._control_w):
                os.close(fd)
            self._thread = None

    def snapshot(self) -> dict:
        self.settle()
        tree = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(self.root))
                if p.is_symlink():
                    tree[rel] = ("link", os.readlink(p))
                elif p.is_fifo():
                    tree[rel] = ("fifo",)
                elif p.is_dir():
                    tree[rel] = ("dir",)
                else:
                    tree[rel] = ("file", p.read_text())
        return {"tree": tree, "overrides": dict(self.overrides)}
