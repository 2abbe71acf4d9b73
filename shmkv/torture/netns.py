"""Network faults against real daemons: a private network namespace and nftables rules.

The choice. The whole run -- harness, clients, daemons -- goes into one network namespace the
harness creates (``unshare -rn``: a user namespace maps us to root inside, so it works
unprivileged), where nothing but its own loopback exists. Each daemon listens on its own
127.0.0.x (x = 2, 3, ...) and binds its outgoing connections to it (transport.pinned_source), so
a packet's source and destination name two nodes; clients stay on 127.0.0.1 and are never cut.
Faults are rules in one nftables chain on the input hook, healed by flushing the chain:

- partition: halves (a node against the rest), a bridge (the others cannot reach each other,
  every one reaches the node), one-way (everything the node sends to its peers is dropped, or
  everything they send it);
- loss: 20 % of the packets between the node and its peers dropped at random (``numgen``). TCP
  retransmits them, so to the daemons this is delay and stalls, not lost messages.

Rejected: a fault-injecting TCP proxy in front of each peer port. The daemons dial the addresses
in the ring, so the ring would have to name the proxies (an ``--advertise`` address the daemon
does not have), and a proxy per destination cannot tell which peer a connection comes from
without the same source binding; the kernel drops packets in ~6 ms without a hop per message
(facts in issue 11). What the kernel cannot give -- netem is not in this kernel -- is *delay*,
*hold* and *reset*: for those (``PROXY_KINDS``) :meth:`NetFaults.redirect` adds a ``nat
output`` rule sending every node-to-node TCP connection to one proxy on 127.0.0.1 (proxy.py,
which dials the original destination from the original source, its socket marked so the rule
skips it). The input-hook rules above still see the real (source, destination) pair on the
proxy's outgoing leg, so partitions and loss compose with it -- except that a cut connection
now connects (to the proxy) and is then reset, instead of timing out in connect.

Outside a namespace the CLI re-executes itself inside one (:func:`reexec_in_netns`); the
namespace, its rules and everything in it vanish when that process exits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidArgument

IN_NETNS_ENV = "SHMKV_TORTURE_NETNS"  # set in the re-executed run: "1" = inside our namespace
PROXY_KINDS = ("delay", "hold", "reset")  # through proxy.py, behind a nat redirect
NET_KINDS = ("partition", "loss", *PROXY_KINDS)
SHAPES = ("halves", "bridge", "one-way-out", "one-way-in")
TABLE = "shmkv_torture"
LOSS_PERCENT = 20


def in_netns() -> bool:
    return os.environ.get(IN_NETNS_ENV) == "1"


def unavailable() -> str | None:
    """Why network faults cannot run here (None: they can)."""
    if shutil.which("unshare") is None:
        return "network faults need unshare (util-linux) to create a private network namespace"
    if shutil.which("nft") is None:
        return "network faults need nft (apt-get install nftables)"
    if in_netns():
        return None
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace (unshare -rn: {probe.stderr.strip()})"
    return None


def needs_netns(cfg: Any) -> bool:
    """Whether this run must be re-executed in a namespace (local cluster, network faults, not
    inside one yet). :raises InvalidArgument: it must, and cannot (the reason named)."""
    net = [k for k in cfg.nemesis if k in NET_KINDS]
    if not net or cfg.cluster != "local" or in_netns():
        return False
    why = unavailable()
    if why is not None:
        raise InvalidArgument(f"nemesis {', '.join(net)}: {why}")
    return True


def reexec_in_netns(args: Sequence[str]) -> int:
    """Run ``python -m shmkv.cli ARGS`` in a fresh network namespace; its exit status."""
    env = {**os.environ, IN_NETNS_ENV: "1"}
    cmd = ["unshare", "-rn", sys.executable, "-m", "shmkv.cli", *args]
    return subprocess.run(cmd, env=env).returncode


def _nft(*script: str) -> None:
    text = "\n".join(script) + "\n"
    r = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    if r.returncode != 0:
        raise InvalidArgument(f"nft refused {text!r}: {r.stderr.strip()}")


class NetFaults:
    """The namespace's loopback and one nftables chain; node addresses are IPv4 literals."""

    def __init__(self) -> None:
        if not in_netns():
            raise InvalidArgument("network faults run inside the harness' network namespace only")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        _nft(f"add table inet {TABLE}",
             f"add chain inet {TABLE} input {{ type filter hook input priority 0; policy accept; }}")

    @staticmethod
    def _drop(src: Sequence[str], dst: Sequence[str], extra: str = "") -> str:
        return (f"add rule inet {TABLE} input ip saddr {{ {', '.join(src)} }} "
                f"ip daddr {{ {', '.join(dst)} }} {extra}drop")

    def partition(self, node: str, others: Sequence[str], shape: str) -> None:
        rules: list[str] = []
        if shape == "halves":
            rules = [self._drop([node], others), self._drop(others, [node])]
        elif shape == "bridge":
            rules = [self._drop([a], [b]) for a in others for b in others if a != b]
        elif shape == "one-way-out":
            rules = [self._drop([node], others)]
        elif shape == "one-way-in":
            rules = [self._drop(others, [node])]
        else:
            raise InvalidArgument(f"unknown partition shape {shape!r}: expected one of {SHAPES}")
        if rules:
            _nft(*rules)

    def split(self, side_a: Sequence[str], side_b: Sequence[str]) -> None:
        """Cut every packet between the two groups of addresses, both ways (a partition
        between data centres); each side still reaches itself, clients on 127.0.0.1 reach all."""
        _nft(self._drop(side_a, side_b), self._drop(side_b, side_a))

    def loss(self, node: str, others: Sequence[str], percent: int = LOSS_PERCENT) -> None:
        """Drop ``percent`` % of the packets between ``node`` and ``others``, both ways, at random."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 < percent < 100:
            raise InvalidArgument(f"loss percent must be an int in 1..99, got {percent!r}")
        extra = f"numgen random mod 100 < {percent} "
        _nft(self._drop([node], others, extra), self._drop(others, [node], extra))

    def redirect(self, nodes: Sequence[str], port: int, mark: int) -> None:
        """Send every TCP connection from one of ``nodes`` to another to 127.0.0.1:``port``
        (the proxy), except the proxy's own (packets marked ``mark``); replaces an earlier
        redirect (one proxy at a time). :meth:`heal` does not touch it, :meth:`unredirect`
        removes it."""
        addrs = ", ".join(nodes)
        _nft(f"add table ip {TABLE}_nat",
             f"add chain ip {TABLE}_nat output {{ type nat hook output priority -100; }}",
             f"flush chain ip {TABLE}_nat output",
             f"add rule ip {TABLE}_nat output meta mark != {mark:#x} ip saddr {{ {addrs} }} "
             f"ip daddr {{ {addrs} }} meta l4proto tcp redirect to :{port}")

    def unredirect(self) -> None:
        _nft(f"add table ip {TABLE}_nat", f"delete table ip {TABLE}_nat")

    def heal(self) -> None:
        _nft(f"flush chain inet {TABLE} input")

    def rules(self) -> str:
        return subprocess.run(["nft", "list", "table", "inet", TABLE], capture_output=True,
                              text=True).stdout
