"""Distributed compilation through distcc (the playbook's `build.distcc`).

The build gets distcc's masquerade directory first on PATH, so a Makefile that calls `gcc` (a
kernel's) compiles through distcc untouched; `CC="distcc CC"` for Makefiles that read $CC;
`DISTCC_HOSTS`; `-jN` in MAKEFLAGS (a `-j` written in build.command wins over it). Whether
distcc may compile locally when no daemon answers is `fallback` (distcc's DISTCC_FALLBACK).

`probe` is what `check` runs where the build runs (the controller, or the build host over
SSH: the same `Remote.run`): per daemon, a TCP connection, then a real compile through it alone,
with fallback off and distcc's own log read back to prove it went there.
"""

from __future__ import annotations

import re

from ..deadline import Deadline


def environment(spec) -> dict[str, str]:
    """The variables a distcc build adds to its environment (PATH is the caller's: the
    masquerade directory goes first on it)."""
    return {
        "DISTCC_HOSTS": " ".join(spec.hosts),
        "CC": f"distcc {spec.cc}",
        "MAKEFLAGS": f"-j{spec.make_jobs}",
        "DISTCC_FALLBACK": "1" if spec.fallback else "0",
    }


def local_environment(spec, env: dict[str, str]) -> dict[str, str]:
    """`env` (a local build's) with distcc's variables and the masquerade directory on PATH."""
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return {**env, **environment(spec), "PATH": f"{spec.masquerade}:{path}"}


def endpoint(host_spec: str) -> tuple[str, int]:
    """`HOST[:PORT][/LIMIT]` (HOST may be `[v6]`) -> (host, port)."""
    hp = host_spec.split("/", 1)[0]
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+)(?::(\d+))?", hp)
    if not m:
        raise ValueError(f"{host_spec!r} is not HOST[:PORT][/LIMIT]")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    return host, int(port) if port else 3632


# $1 compiler, then host/port pairs. One "label<TAB>ok|fail<TAB>detail" line per daemon.
_PROBE = r"""cc=$1; shift
dir=$(mktemp -d) || exit 1
trap 'rm -rf "$dir"' EXIT
printf 'int fleetbisect_probe(void) { return 42; }\n' > "$dir/probe.c"
if ! command -v distcc >/dev/null; then echo "distcc	fail	distcc is not installed where the build runs"; exit 0; fi
while [ $# -ge 2 ]; do
  host=$1 port=$2; shift 2
  label="distcc $host:$port"
  if [ "$host" = localhost ]; then echo "$label	ok	distcc compiles locally for the host named localhost"; continue; fi
  if ! timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>"$dir/err"; then
    echo "$label	fail	no distcc daemon answers at $host:$port: $(tail -1 "$dir/err" | sed 's/.*: //') (is distccd running there, listening on that address, allowing this machine?)"
    continue
  fi
  : > "$dir/log"
  if DISTCC_HOSTS="$host:$port" DISTCC_FALLBACK=0 DISTCC_SKIP_LOCAL_RETRY=1 DISTCC_LOG="$dir/log" DISTCC_VERBOSE=1 \
     timeout 60 distcc "$cc" -c "$dir/probe.c" -o "$dir/probe.o" 2>"$dir/err" \
     && grep -q "on $host:$port completed ok" "$dir/log"; then
    echo "$label	ok	a test compile with $cc went through the daemon"
  else
    why=$(grep -h -i 'error\|warning\|refused\|failed' "$dir/err" "$dir/log" | tail -2 | tr '\n' ' ')
    echo "$label	fail	the daemon answers but a test compile with $cc through it failed: ${why:-no reason given}"
  fi
done
"""


def probe(spec, remote, deadline: Deadline) -> list[tuple[str, bool, str]]:
    """(name, ok, detail) per daemon, probed from `remote` (where the build runs)."""
    args = []
    for h in spec.hosts:
        args += list(map(str, endpoint(h)))
    res = remote.run(["bash", "-c", _PROBE, "fleetbisect-distcc-probe", spec.cc, *args], deadline=deadline)
    found = []
    for line in res.stdout.splitlines():
        name, status, detail = (line.split("\t", 2) + ["", ""])[:3]
        if status in ("ok", "fail"):
            found.append((name, status == "ok", detail))
    if not found:
        found.append(("distcc", False, f"the probe did not run (exit {res.exit_status}): "
                      + res.stderr.strip()[-200:]))
    return found
