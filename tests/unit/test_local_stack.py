"""Where app.local_stack puts the emulators' and gateways' ports: below the kernel's ephemeral range, from which
every outgoing connection takes its local port (a port found free there may be taken before a child binds it)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from app.local_stack import EMULATOR_PORT_BASE, GATEWAY_PORT_BASE, free_ports

HEADROOM = 1000  # ports a large local stack may count up from a base (free_ports skips the taken ones)


def ephemeral_range() -> tuple[int, int]:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return low, high


@pytest.mark.parametrize("base", [EMULATOR_PORT_BASE, GATEWAY_PORT_BASE], ids=["emulators", "gateways"])
def test_the_port_bases_are_below_the_ephemeral_range(base: int) -> None:
    low, _ = ephemeral_range()
    assert base >= 1024 and base + HEADROOM <= low, f"{base}..{base + HEADROOM} reaches the ephemeral range {low}.."


def test_free_ports_counts_up_from_its_base_past_a_taken_port() -> None:
    ports = free_ports(3, GATEWAY_PORT_BASE)
    assert ports == sorted(set(ports)) and ports[0] >= GATEWAY_PORT_BASE and ports[-1] < ephemeral_range()[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[0]))
        (next_free,) = free_ports(1, ports[0])
    assert next_free > ports[0]
