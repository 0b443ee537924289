"""What a bare-metal box runs to install a candidate and boot it once (pure functions and the
shell scripts they feed; targets/baremetal.py runs them over SSH).

A candidate is installed as BOOT_DIR/vmlinuz-NAME (+ initrd.img-NAME, + /lib/modules from a
`modules` tarball), NAME being the build's release, which carries the commit (-fb<commit>).
The names installed are listed in WORK_DIR/baremetal/installed; before each install the older
ones (and only those: never a kernel fleetbisect did not put there) are removed, so /boot never
fills, and the install refuses with a clear error when /boot still lacks room.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

from ..errors import UserError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,120}")


def install_name(release: str | None, kernel_sha: str = "") -> str:
    """The file-name part of an installed candidate: its release (it carries the commit), or a
    digest of the kernel when the build stamps no release."""
    if release:
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", release)
        if SAFE_NAME.fullmatch(name):
            return name
    return "fleetbisect-" + (kernel_sha or hashlib.sha256(repr(release).encode()).hexdigest())[:16]


def manifest(work_dir: str) -> str:
    return posixpath.join(work_dir, "baremetal", "installed")


# $1 boot dir, $2 name, $3 manifest, $4 kernel, $5 initrd ('' for none), $6 modules tarball ('').
INSTALL = r"""
set -u
boot=$1; name=$2; list=$3; kernel=$4; initrd=$5; modules=$6
mkdir -p "$boot" "$(dirname "$list")" || exit 3
touch "$list" || exit 3
while read -r old; do
  [ -n "$old" ] && [ "$old" != "$name" ] || continue
  case "$old" in */*|.*) continue;; esac
  rm -f "$boot/vmlinuz-$old" "$boot/initrd.img-$old" "$boot/System.map-$old" "$boot/config-$old"
  [ -d "/lib/modules/$old/kernel" ] && [ -e "/lib/modules/$old/.fleetbisect" ] && rm -rf "/lib/modules/$old"
  echo "removed $old"
done < "$list"
size=$(wc -c < "$kernel")
[ -n "$initrd" ] && size=$((size + $(wc -c < "$initrd")))
need=$((size / 1024 + 1024))
free=$(df -Pk "$boot" | awk 'NR==2 {print $4}')
if [ "${free:-0}" -lt "$need" ]; then
  echo "no room in $boot: ${free:-?} KiB free, $need KiB needed (after removing older test kernels)" >&2; exit 4
fi
echo "$name" > "$list.new" && mv -f "$list.new" "$list" || exit 3
cp "$kernel" "$boot/vmlinuz-$name.tmp" && mv -f "$boot/vmlinuz-$name.tmp" "$boot/vmlinuz-$name" || exit 3
if [ -n "$initrd" ]; then
  cp "$initrd" "$boot/initrd.img-$name.tmp" && mv -f "$boot/initrd.img-$name.tmp" "$boot/initrd.img-$name" || exit 3
fi
if [ -n "$modules" ]; then
  tar -xzf "$modules" -C / || exit 3
  [ -d "/lib/modules/$name" ] && touch "/lib/modules/$name/.fleetbisect"
fi
sync
echo "installed $boot/vmlinuz-$name"
"""

# $1 boot dir, $2 manifest: remove every test kernel fleetbisect installed (restore).
REMOVE_ALL = r"""
boot=$1; list=$2
[ -f "$list" ] || exit 0
while read -r old; do
  case "$old" in ''|*/*|.*) continue;; esac
  rm -f "$boot/vmlinuz-$old" "$boot/initrd.img-$old" "$boot/System.map-$old" "$boot/config-$old"
  [ -e "/lib/modules/$old/.fleetbisect" ] && rm -rf "/lib/modules/$old"
  echo "removed $old"
done < "$list"
rm -f "$list"
"""

# Run "$@" one second from now, detached from this SSH session (it reboots the box).
DETACHED = '(sleep 1; exec "$@") >/dev/null 2>&1 </dev/null &'


def paths(boot_dir: str, name: str, with_initrd: bool) -> tuple[str, str | None]:
    kernel = posixpath.join(boot_dir, f"vmlinuz-{name}")
    return kernel, posixpath.join(boot_dir, f"initrd.img-{name}") if with_initrd else None


def kexec_load_argv(kernel: str, initrd: str | None, cmdline: str) -> list[str]:
    argv = ["kexec", "-l", kernel]
    if initrd:
        argv.append(f"--initrd={initrd}")
    return argv + [f"--command-line={cmdline}"]


def command_argv(template: list[str], *, kernel: str, initrd: str | None, cmdline: str, release: str) -> list[str]:
    """The inventory's custom one-shot command, its placeholders filled in word by word (each
    word stays one argv item: nothing is pasted into a shell line)."""
    values = {"{kernel}": kernel, "{initrd}": initrd or "", "{cmdline}": cmdline, "{release}": release}
    out = []
    for word in template:
        for k, v in values.items():
            word = word.replace(k, v)
        out.append(word)
    return out


_ENTRY = re.compile(r"""^\s*(menuentry|submenu)\s+(['"])(.*?)\2.*?\$menuentry_id_option\s+(['"])(.*?)\4""")
_LINUX = re.compile(r"^\s*linux(?:efi|16)?\s+(\S+)")


def grub_entry(cfg: str, kernel_file: str) -> str:
    """The id `grub-reboot` takes for the (non-recovery) entry booting `kernel_file`
    (e.g. vmlinuz-6.1.0-fb1234): "SUBMENU_ID>ENTRY_ID" when it sits in a submenu, as Debian's
    "Advanced options" do. Raises UserError when grub.cfg has no such entry."""
    stack: list[tuple[str, str, str]] = []  # (kind, title, id) of the open blocks
    depth_of: list[int] = []
    depth = 0
    for line in cfg.splitlines():
        m = _ENTRY.match(line)
        if m:
            stack.append((m.group(1), m.group(3), m.group(5)))
            depth_of.append(depth)
        lx = _LINUX.match(line)
        if lx and stack and stack[-1][0] == "menuentry" and posixpath.basename(lx.group(1)) == kernel_file \
                and "recovery mode" not in stack[-1][1]:
            return ">".join(ident for _, _, ident in stack)
        depth += line.count("{") - line.count("}")
        while depth_of and depth <= depth_of[-1]:
            depth_of.pop()
            stack.pop()
    raise UserError(f"grub.cfg has no entry booting {kernel_file} (did update-grub run?)")
