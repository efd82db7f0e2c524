"""DeepSpeed hostfiles (`IP slots=N` per line), checked so that a bad one fails before any launch."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import GuardtuneError

_LINE = re.compile(r"^(\S+)\s+slots\s*=\s*(\d+)$")


@dataclass(frozen=True)
class Host:
    ip: str
    slots: int


def read_hostfile(path: Path) -> list[Host]:
    path = Path(path)
    if not path.is_file():
        raise GuardtuneError(f"hostfile {path}: no such file")
    hosts: list[Host] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise GuardtuneError(f"{path}:{n}: expected 'IP slots=N', got '{line}'")
        host, slots = m.group(1), int(m.group(2))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # Hostnames that resolve differently (or not at all) on another node were the classic
            # multi-node failure: "cannot find host". IPs mean the same thing on every node.
            raise GuardtuneError(f"{path}:{n}: '{host}' is a hostname; write the node's IP address") from None
        if slots < 1:
            raise GuardtuneError(f"{path}:{n}: slots must be at least 1")
        if any(h.ip == host for h in hosts):
            raise GuardtuneError(f"{path}:{n}: host {host} is listed twice")
        hosts.append(Host(host, slots))
    if not hosts:
        raise GuardtuneError(f"hostfile {path}: no hosts")
    return hosts
