"""`kind: libvirt`: a libvirt domain on the host, driven with `virsh` over the host's SSH
connection (the controller needs no libvirt bindings; every word is an argv item).

Two ways to have a domain:

- `domain: repro-vm` alone: the domain exists. Before the first change its definition
  (`virsh dumpxml --inactive --security-info`) and state are saved on the host, in
  WORK_DIR/libvirt/<domain>.orig.xml (written once: a later run or a resume keeps the first
  copy while it exists). restore() (the run's end, an abort, the end of a resumed run) stops
  our kernel, defines the saved XML again, checks that libvirt now reports exactly it, removes
  the copy and starts the domain again if it was running before.
- `template: builtin` or `template: PATH` (an XML file on the controller): fleetbisect defines
  the domain under the name `domain` and undefines it in restore(). A marker file
  (<domain>.defined) says the domain is ours; a domain of that name that is not ours is never
  touched.

Each step: stop() destroys the domain if it runs (by name through libvirt, never a process
match), deploy() defines the step's XML (the base above with <kernel>/<initrd>/<cmdline>, serial
0 logged to WORK_DIR/libvirt/<domain>.console.log, no restart on reboot or crash), start() is
`virsh start`, alive() and wait_off() read `virsh domstate`. The guest is reached at the
inventory's address (a fixed address, or the port the domain forwards), or at the address
`virsh domifaddr` reports (`guest_address: domifaddr`).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shlex
from pathlib import Path
from typing import Literal, Mapping

from pydantic import field_validator

from ..config.target import TargetConfig
from ..deadline import Deadline
from ..errors import InfraError
from ..files import write_text_masked
from ..remote.agent import AgentRemote
from ..remote.agent_transport import VirshTransport
from ..remote.base import Remote, RemoteCommandFailed, Result, SSHParams
from ..stages.image import deploy_image
from ..stages.image import probes as image_probes
from . import domainxml as dx
from . import virtiofs
from .base import Check, Target, TargetStartFailed
from .passthrough import Passthrough, hostdev_xml

RUNNING_STATES = ("running", "idle", "paused", "in shutdown", "pmsuspended", "blocked")


AGENT_ATTEMPT = 5.0  # seconds one login through the agent may take before the next try


class VirshError(InfraError):
    """`virsh` failed; the message carries its error text."""


class LibvirtConfig(TargetConfig):
    """`target: {kind: libvirt, domain: NAME, ...}` in the inventory."""

    kind: Literal["libvirt"]
    uri: str = "qemu:///system"
    domain: str
    template: str | None = None  # None: `domain` exists; "builtin" or an XML file: we define it
    # For the built-in template only:
    domain_type: Literal["qemu", "kvm"] = "qemu"
    machine: str = "q35"
    emulator: str | None = None
    network: str = "user"  # QEMU user networking forwarding guest.port, or a libvirt network's name
    guest_address: Literal["inventory", "domifaddr"] = "inventory"

    @field_validator("domain")
    @classmethod
    def _name(cls, v: str) -> str:
        if not dx.DOMAIN_NAME.fullmatch(v):
            raise ValueError(f"{v!r}: a domain name of letters, digits and _.+- (up to 64), "
                             "not starting with a punctuation mark")
        return v

    @field_validator("template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None or v == "builtin":
            return v
        path = Path(os.path.expanduser(v))
        try:
            dx.parse(path.read_text())
        except OSError as e:
            raise ValueError(f"{v!r}: cannot read the template ({e.strerror or e})") from None
        except (dx.DomainXMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{v!r}: not a libvirt domain template: {e}") from None
        return v


@dataclasses.dataclass(frozen=True)
class HostFiles:
    """What the target keeps on the host, in WORK_DIR/libvirt."""

    dir: str
    domain: str

    def _f(self, suffix: str) -> str:
        return posixpath.join(self.dir, f"{self.domain}.{suffix}")

    @property
    def original(self) -> str:
        return self._f("orig.xml")

    @property
    def original_state(self) -> str:
        return self._f("orig.state")

    @property
    def defined(self) -> str:
        return self._f("defined")

    @property
    def step_xml(self) -> str:
        return self._f("step.xml")

    @property
    def console(self) -> str:
        return self._f("console.log")


# Save the domain's definition and state once, atomically; print the saved definition.
_SAVE_ORIGINAL = r"""
umask 077; f=$1; st=$2; dom=$3; shift 3
if [ ! -s "$f" ]; then
  mkdir -p "$(dirname "$f")" || exit 1
  "$@" dumpxml --inactive --security-info "$dom" > "$f.tmp" || { rm -f "$f.tmp"; exit 3; }
  "$@" domstate "$dom" > "$st.tmp" 2>/dev/null || echo unknown > "$st.tmp"
  mv -f "$st.tmp" "$st" && mv -f "$f.tmp" "$f" || exit 1
fi
exec cat "$f"
"""

# Write the step's XML (stdin), drop the last console, define the domain.
_DEFINE = r"""
umask 077; dir=$1; xml=$2; console=$3; shift 3
mkdir -p "$dir" && cat > "$xml" && rm -f "$console" && exec "$@" define "$xml"
"""

# Wait until the domain is shut off (or crashed), up to $1 seconds.
_WAIT_OFF = r"""
end=$(( $(date +%s) + $1 )); shift
while :; do
  case "$("$@" 2>/dev/null)" in "shut off"*|crashed*) exit 0;; esac
  [ "$(date +%s)" -ge "$end" ] && exit 1
  sleep 0.2
done
"""


def _missing(res: Result) -> bool:
    """virsh said the domain does not exist."""
    text = res.stderr.lower()
    return "failed to get domain" in text or "domain not found" in text


class Libvirt(Target):
    """`kind: libvirt`: see the module docstring."""

    kind = "libvirt"
    Config = LibvirtConfig

    def __init__(self, host_cfg, playbook):
        super().__init__(host_cfg, playbook)
        self.files = HostFiles(posixpath.join(host_cfg.work_dir, "libvirt"), self.config.domain)
        self._base: str | None = None  # this attempt's base XML, once read
        self._address: str | None = None  # from `virsh domifaddr`, once seen
        self.disk: tuple[str, str] | None = None  # (path, format) of the deployed disk image
        self.passthrough = Passthrough(self.config.pci, host_cfg.work_dir)

    @property
    def defines(self) -> bool:
        """True when fleetbisect defines (and undefines) the domain itself."""
        return self.config.template is not None

    # --- virsh ------------------------------------------------------------------------------

    def virsh_argv(self, *args: str) -> list[str]:
        return ["virsh", "-q", "-c", self.config.uri, *args]

    def virsh(self, host: Remote, *args: str, deadline: Deadline, check: bool = True,
              stdin: bytes | None = None) -> Result:
        res = host.run(self.virsh_argv(*args), deadline=deadline.sub(120), stdin=stdin)
        if check and not res.ok:
            raise self._error(res, args[0])
        return res

    def _error(self, res: Result, what: str) -> VirshError:
        text = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:]) or f"exit {res.exit_status}"
        return VirshError(f"virsh {what} {self.config.domain} ({self.config.uri}) failed: {text}")

    def state(self, host: Remote, deadline: Deadline) -> str | None:
        """`virsh domstate`: "running", "shut off", ...; None when the domain does not exist."""
        res = self.virsh(host, "domstate", self.config.domain, deadline=deadline, check=False)
        if res.ok:
            return res.stdout.strip().splitlines()[0] if res.stdout.strip() else "unknown"
        if _missing(res):
            return None
        raise self._error(res, "domstate")

    def _destroy(self, host: Remote, deadline: Deadline) -> str:
        state = self.state(host, deadline)
        if state is None or state not in RUNNING_STATES:
            return ""
        res = self.virsh(host, "destroy", self.config.domain, deadline=deadline, check=False)
        if not res.ok and "not running" not in res.stderr:
            raise self._error(res, "destroy")
        return f"destroyed domain {self.config.domain} (was {state})"

    def _exists_file(self, host: Remote, path: str, deadline: Deadline) -> bool:
        return host.run(["test", "-s", path], deadline=deadline.sub(30)).ok

    # --- the domain's XML ----------------------------------------------------------------------

    def base_xml(self, host: Remote, deadline: Deadline) -> str:
        """The definition every step starts from: the user's saved original (saved now if this
        is the first change), or the template under our name."""
        if self._base is None:
            self._base = self._template_xml() if self.defines else self._save_original(host, deadline)
        return self._base

    def _save_original(self, host: Remote, deadline: Deadline) -> str:
        res = host.run(["sh", "-c", _SAVE_ORIGINAL, "sh", self.files.original, self.files.original_state,
                        self.config.domain, *self.virsh_argv()], deadline=deadline.sub(120))
        if res.exit_status == 3:
            raise self._error(res, "dumpxml")
        if not res.ok or not res.stdout.strip():
            raise InfraError(f"could not save the definition of domain {self.config.domain} in "
                             f"{self.files.original}: {res.stderr.strip()[-300:]}")
        return res.stdout

    def _template_xml(self) -> str:
        cfg, boot, guest = self.config, self.playbook.boot, self.config.guest
        if cfg.template == "builtin":
            return dx.builtin(cfg.domain, domain_type=cfg.domain_type, machine=cfg.machine,
                              memory_mb=boot.memory, cpus=boot.cpus, network=cfg.network,
                              guest_address=guest.address, guest_port=guest.port,
                              emulator=cfg.emulator)
        root = dx.parse(Path(os.path.expanduser(cfg.template)).read_text())
        dx.set_name(root, cfg.domain)
        return dx.serialize(root)

    def step_xml(self, base: str, artifacts: Mapping[str, str]) -> str:
        """The domain for one step: `base` pointed at this step's kernel (direct kernel boot,
        when the playbook builds one) and disk image (when it builds one), its console logged
        to a file, no restart; the agent's channel, <hostdev> and virtiofs as the inventory says."""
        cfg = self.config
        root = dx.parse(base)
        if artifacts.get("kernel"):
            dx.direct_kernel_boot(root, artifacts["kernel"], artifacts.get("initrd"), self.playbook.boot.cmdline)
        if self.disk is not None:
            dx.boot_disk(root, *self.disk)
        if cfg.guest.has_agent:
            dx.agent_channel(root)
        dx.add_devices(root, [hostdev_xml(a) for a in cfg.pci])
        if cfg.virtiofs:
            dx.add_devices(root, [virtiofs.filesystem_xml(cfg.virtiofs)])
            dx.memory_backing(root, virtiofs.memory_backing_xml())
        dx.serial_console(root, self.files.console)
        dx.no_restart(root)
        return dx.serialize(root)

    # --- once per run -------------------------------------------------------------------------

    def probes(self, host: Remote, deadline: Deadline) -> list[Check]:
        cfg = self.config
        res = self.virsh(host, "version", deadline=deadline, check=False)
        if not res.ok:
            return [Check("virsh", False, f"{cfg.uri}: {(res.stderr or res.stdout).strip()[-300:]}")]
        version = next((ln for ln in res.stdout.splitlines() if "hypervisor" in ln.lower()), "").strip()
        checks = [Check("virsh", True, f"{cfg.uri} answers" + (f" ({version})" if version else ""))]
        xml_text = None
        if self.defines:
            try:
                xml_text = self._template_xml()
                dx.parse(xml_text)
                ok, detail = True, f"{cfg.template}: a valid domain definition"
            except (OSError, dx.DomainXMLError) as e:
                ok, detail = False, f"{cfg.template}: {e}"
            state = self.state(host, deadline)
            ours = self._exists_file(host, self.files.defined, deadline)
            if state is not None and not ours:
                ok, detail = False, f"a domain named {cfg.domain} exists and fleetbisect did not define it"
            checks.append(Check("libvirt template", ok, detail))
        else:
            state = self.state(host, deadline)
            if state is None:
                checks.append(Check("libvirt domain", False, f"no domain {cfg.domain} at {cfg.uri}"))
                return checks
            saved = self._exists_file(host, self.files.original, deadline)
            checks.append(Check("libvirt domain", True, f"{cfg.domain} ({state})" + (
                f"; the definition saved by an earlier run ({self.files.original}) is restored at the end"
                if saved else "; its definition is saved before the first step and restored at the end")))
            xml_text = self.virsh(host, "dumpxml", "--inactive", cfg.domain, deadline=deadline).stdout
        checks.append(self._emulator_check(host, xml_text, deadline))
        if self.playbook.disk_image is not None:
            checks += image_probes(host, self.playbook.disk_image, self.host_cfg.work_dir, deadline)
        checks += self.passthrough.probes(host, deadline, None)  # libvirt locks the guest's memory itself
        return checks

    def _emulator_check(self, host: Remote, xml_text: str | None, deadline: Deadline) -> Check:
        path = None
        try:
            root = dx.parse(xml_text) if xml_text else None
        except dx.DomainXMLError:
            root = None
        if root is not None:
            path = dx.emulator(root)
        if path is None:  # libvirt picks it: ask which one
            res = self.virsh(host, "domcapabilities", "--virttype", self.config.domain_type,
                             deadline=deadline, check=False)
            if not res.ok:
                return Check("emulator", False, (res.stderr or res.stdout).strip()[-300:])
            try:
                node = dx.ET.fromstring(res.stdout).find("path")
                path = node.text.strip() if node is not None and node.text else None
            except dx.ET.ParseError:
                path = None
            if path is None:
                return Check("emulator", False, "libvirt names no emulator for this domain type")
        ok = host.run(["test", "-x", path], deadline=deadline.sub(30)).ok
        return Check("emulator", ok, path if ok else f"{path} is not an executable on the host")

    def restore(self, host: Remote, deadline: Deadline) -> str:
        done = self._undefine(host, deadline) if self.defines else self._restore_original(host, deadline)
        given_back = self.passthrough.restore(host, deadline) if self.config.pci else ""
        return "; ".join(d for d in (done, given_back) if d)

    def _restore_original(self, host: Remote, deadline: Deadline) -> str:
        f = self.files
        if not self._exists_file(host, f.original, deadline):
            return ""
        self._destroy(host, deadline)
        self.virsh(host, "define", f.original, deadline=deadline)
        now = self.virsh(host, "dumpxml", "--inactive", "--security-info", self.config.domain,
                         deadline=deadline).stdout
        saved = host.run(["cat", f.original], deadline=deadline.sub(30), check=True).stdout
        if now != saved:
            raise InfraError(f"domain {self.config.domain} was defined from {f.original} but libvirt "
                             "reports a different definition; the saved copy is kept")
        was = host.run(["cat", f.original_state], deadline=deadline.sub(30)).stdout.strip()
        host.run(["rm", "-f", f.original, f.original_state], deadline=deadline.sub(30), check=True)
        done = f"defined domain {self.config.domain} from its saved definition"
        if was in RUNNING_STATES:
            self.virsh(host, "start", self.config.domain, deadline=deadline)
            done += " and started it again (it was running)"
        return done

    def _undefine(self, host: Remote, deadline: Deadline) -> str:
        if not self._exists_file(host, self.files.defined, deadline):
            return ""
        self._destroy(host, deadline)
        res = self.virsh(host, "undefine", self.config.domain, deadline=deadline, check=False)
        if not res.ok and not _missing(res):
            raise self._error(res, "undefine")
        host.run(["rm", "-f", self.files.defined], deadline=deadline.sub(30), check=True)
        return f"undefined domain {self.config.domain}"

    # --- per step -----------------------------------------------------------------------------

    def stop(self, host: Remote, deadline: Deadline) -> str:
        if not self.defines:
            self.base_xml(host, deadline)  # stopping the user's domain is the first change
        return self._destroy(host, deadline)

    def deploy(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        if self.defines:
            self._claim(host, deadline)
        spec = self.playbook.disk_image
        if spec is not None:  # converted beside the old disk, renamed when complete
            self.disk = (deploy_image(host, artifacts["image"], spec, self.host_cfg.work_dir, deadline), spec.format)
        xml = self.step_xml(self.base_xml(host, deadline), artifacts)
        write_text_masked(step_dir / "domain.xml", dx.redacted(xml))
        argv = ["sh", "-c", _DEFINE, "sh", self.files.dir, self.files.step_xml, self.files.console,
                *self.virsh_argv()]
        write_text_masked(step_dir / "commands.txt", shlex.join(self.virsh_argv("define", self.files.step_xml)) + "\n")
        res = host.run(argv, deadline=deadline.sub(120), stdin=xml.encode())
        if not res.ok:
            raise TargetStartFailed(str(self._error(res, "define")))

    def _claim(self, host: Remote, deadline: Deadline) -> None:
        """Before defining: the domain must be ours (our marker) or not exist; mark it ours."""
        if self._exists_file(host, self.files.defined, deadline):
            return
        if self.state(host, deadline) is not None:
            raise TargetStartFailed(
                f"a domain named {self.config.domain} exists at {self.config.uri} and fleetbisect did "
                "not define it: name another domain, or drop `template` to use this one as it is")
        script = 'umask 077; mkdir -p "$1" && echo "$3" > "$2"'
        host.run(["sh", "-c", script, "sh", self.files.dir, self.files.defined, self.config.domain],
                 deadline=deadline.sub(30), check=True)

    def start(self, host: Remote, artifacts: Mapping[str, str], step_dir: Path, deadline: Deadline) -> None:
        if self.config.pci:  # the groups go to vfio-pci (once a run; the record is kept on the host)
            try:
                self.passthrough.bind(host, deadline.sub(60))
            except RemoteCommandFailed as e:
                raise TargetStartFailed(f"PCI passthrough: {e.result.stderr.strip()[-300:]}") from None
        argv = self.virsh_argv("start", self.config.domain)
        with open(step_dir / "commands.txt", "a") as f:
            f.write(shlex.join(argv) + "\n")
        res = host.run(argv, deadline=deadline.sub(120))
        if not res.ok:
            raise TargetStartFailed(str(self._error(res, "start")))

    def alive(self, host: Remote, deadline: Deadline) -> bool:
        return self.state(host, deadline) in RUNNING_STATES

    def wait_off(self, host: Remote, seconds: float) -> bool:
        res = host.run(["sh", "-c", _WAIT_OFF, "sh", str(int(seconds) + 1),
                        *self.virsh_argv("domstate", self.config.domain)],
                       deadline=Deadline.after(seconds + 30))
        return res.ok

    def fetch_console(self, host: Remote, local: Path, deadline: Deadline) -> None:
        host.get(self.files.console, local, deadline=deadline)

    # --- how the guest is reached -------------------------------------------------------------

    def _guest_address(self, host: Remote) -> str | None:
        if self.config.guest_address == "inventory":
            return self.config.guest.address
        if self._address is None:
            for source in ("lease", "arp", "agent"):
                res = self.virsh(host, "domifaddr", self.config.domain, "--source", source,
                                 deadline=Deadline.after(15), check=False)
                found = dx.parse_domifaddr(res.stdout) if res.ok else []
                if found:
                    self._address = found[0]
                    break
        return self._address

    def endpoint(self, host: Remote):
        from ..stages.ready import GuestEndpoint

        g = self.config.guest
        address = self._guest_address(host)
        if address is None:
            raise VirshError(f"virsh domifaddr {self.config.domain} reports no address yet")
        return GuestEndpoint(address, g.port, host if g.via == "host" else None)

    @property
    def reached_by(self) -> str:
        return "the guest agent" if self.config.guest.reach == "agent" else "SSH"

    def login(self, host: Remote, deadline: Deadline) -> Remote:
        """SSH by default; with `reach: agent` the guest agent through `virsh qemu-agent-command`
        (libvirt owns the agent's socket). One short attempt: waiting still notices a dead domain."""
        if self.config.guest.reach != "agent":
            return super().login(host, deadline)
        transport = VirshTransport(host, self.config.domain, uri=self.config.uri)
        return AgentRemote.connect(transport, deadline=deadline.sub(AGENT_ATTEMPT))

    def probe(self, host: Remote) -> bool:
        if self.config.guest.reach == "agent":
            return True  # the login attempt is the probe
        if self._guest_address(host) is None:
            return False  # no lease yet: libvirt is asked again at the next poll
        return super().probe(host)

    def guest_params(self) -> SSHParams:
        params = super().guest_params()
        if self._address is not None:
            params = dataclasses.replace(params, host=self._address)
        return params
