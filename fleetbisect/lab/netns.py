"""Two network namespaces joined by a veth pair: two "machines" on a private link, with no
address in this machine's own namespace (the lab's network is loopback and namespaces the
tests create, nothing else).

    pair = NetnsPair.create()          # fb-<token>-a 10.254.N.1/30 <-> fb-<token>-b 10.254.N.2/30
    subprocess.run(pair.run_in("b", ["distccd", ...]))
    pair.delete()                      # the namespaces and the link; stop what runs there first
"""

from __future__ import annotations

import secrets
import subprocess
import weakref


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _delete(names: tuple[str, ...]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, stdin=subprocess.DEVNULL)


class NetnsPair:
    def __init__(self, token: str, subnet: int):
        self.names = {"a": f"fb-{token}-a", "b": f"fb-{token}-b"}
        self.addresses = {"a": f"10.254.{subnet}.1", "b": f"10.254.{subnet}.2"}
        self._finalizer = weakref.finalize(self, _delete, tuple(self.names.values()))

    @classmethod
    def create(cls) -> "NetnsPair":
        token = secrets.token_hex(3)
        pair = cls(token, int(token[:2], 16))
        a, b = pair.names["a"], pair.names["b"]
        try:
            for ns in (a, b):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            # created inside a, its peer moved to b: never an interface in this namespace
            _ip("-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b)
            for side, ns in (("a", a), ("b", b)):
                _ip("-n", ns, "addr", "add", f"{pair.addresses[side]}/30", "dev", f"veth-{side}")
                _ip("-n", ns, "link", "set", f"veth-{side}", "up")
        except BaseException:
            pair.delete()
            raise
        return pair

    def run_in(self, side: str, argv: list[str]) -> list[str]:
        """argv run inside namespace `side` (`ip netns exec` execs it: the PID is argv's)."""
        return ["ip", "netns", "exec", self.names[side], *argv]

    def delete(self) -> None:
        self._finalizer()
