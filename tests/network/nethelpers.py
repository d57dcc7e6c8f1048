"""Helpers for the networking tests: look inside a namespace with iproute2
(`ip -j`), a tool independent of the pyroute2 code under test."""

from __future__ import annotations

import json
import subprocess
from typing import Any


class Netns:
    """A named network namespace and helpers to look inside it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "-n", self.name, *args], check=check, capture_output=True, text=True
        )

    def link(self, ifname: str) -> dict[str, Any] | None:
        """`ip -j -d link show dev IFNAME` as a dict, or None if absent."""
        result = self.ip("-j", "-d", "link", "show", "dev", ifname, check=False)
        if result.returncode != 0:
            return None
        links: list[dict[str, Any]] = json.loads(result.stdout)
        return links[0]

    def require(self, ifname: str) -> dict[str, Any]:
        """Like ``link``, but the interface must exist."""
        link = self.link(ifname)
        assert link is not None, f"{ifname} does not exist in {self.name}"
        return link

    def links(self) -> dict[str, dict[str, Any]]:
        result = self.ip("-j", "-d", "link", "show")
        return {link["ifname"]: link for link in json.loads(result.stdout)}

    def taps(self) -> set[str]:
        return {
            name
            for name, link in self.links().items()
            if link.get("linkinfo", {}).get("info_kind") == "tun"
        }

    def ipv4(self, ifname: str) -> set[str]:
        result = self.ip("-j", "-4", "addr", "show", "dev", ifname)
        return {
            f"{a['local']}/{a['prefixlen']}"
            for entry in json.loads(result.stdout)
            for a in entry.get("addr_info", [])
        }
