"""Multicast groups, the one place for their rules: a UDP listener that joins a group
(``udp://239.192.0.2:4242?iface=eth0``, ``udp://[ff84::2]:4242?iface=eth0``, as Zephyr's
net-tools echo-server answers the samples' groups) and a tool that sends to one
(``udp://239.192.0.2:4242?iface=eth0&ttl=1&loop=0``).

A listener binds the group's address and port (so it receives that group's datagrams on that
port and nothing else), joins it on the interface named (``MCAST_JOIN_GROUP``, one call for
both families; ``?source=`` makes it a source-specific join, IGMPv3/MLDv2's
``MCAST_JOIN_SOURCE_GROUP``) and answers each datagram by unicast: a socket bound to a
multicast address sends from the interface's own address (Linux's inet_bind: "use device"),
as net-tools' echo-server does. The UDP guard's rules hold as for any UDP listener.

A sender sets the interface (``IP_MULTICAST_IF`` with the index, ``IPV6_MULTICAST_IF``), the hop
limit (``ttl``, default 1: the segment only) and whether its own host's members hear it
(``loop``, default 1, the kernel's). Answers come back by unicast from each responder.

Why the raw socket options and not a library: the stdlib has the calls and the structs are
two (group_req, group_source_req); no maintained library wraps the joins (netifaces and
friends list interfaces, they do not join)."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
from urllib.parse import parse_qsl, urlencode

# linux/in.h: the protocol-independent joins (RFC 3678), the same number at IPPROTO_IP and
# IPPROTO_IPV6
MCAST_JOIN_GROUP = 42
MCAST_JOIN_SOURCE_GROUP = 46
_SOCKADDR_STORAGE = 128
LISTENER_OPTIONS = ("iface", "source")
TARGET_OPTIONS = ("iface", "ttl", "loop")
DEFAULT_TTL = 1  # the segment only: a lab's boards, not the site
MAX_TTL = 255


class GroupError(ValueError):
    """A group option that cannot be (one line)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """A multicast group's options: the interface, a source (listener), ttl and loop
    (sender)."""

    iface: str = ""  # "": the kernel's choice (the route to the group)
    source: str = ""
    ttl: int = DEFAULT_TTL
    loop: bool = True

    def query(self) -> str:
        """The options as a URL's query (what was given, for display)."""
        pairs = [("iface", self.iface)] if self.iface else []
        if self.source:
            pairs.append(("source", self.source))
        return urlencode(pairs)


def is_multicast(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_multicast
    except ValueError:
        return False


def split_query(query: str, names: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The group's options out of a URL's query, and the rest (impairments, for a listener)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        return {}, query  # the rest's parser names the malformed query
    ours = {k: v for k, v in pairs if k in names}
    rest = urlencode([(k, v) for k, v in pairs if k not in names])
    return ours, rest


def listener_group(host: str, options: dict[str, str], url: str) -> Group | None:
    """A listener's group, None for a unicast listener; GroupError for options that do not
    fit (an interface for a unicast address, a source of another family)."""
    if not is_multicast(host):
        if options:
            names = ", ".join(f"?{k}=" for k in options)
            raise GroupError(f"--bind {url!r}: {names} is for a multicast group; {host} is not one")
        return None
    source = options.get("source", "")
    if source:
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            raise GroupError(f"--bind {url!r}: source={source!r} is not an address") from None
        if ip.version != ipaddress.ip_address(host).version or ip.is_multicast:
            raise GroupError(f"--bind {url!r}: source={source} is not a unicast address of "
                             f"the group's family")  # fmt: skip
    return Group(iface=options.get("iface", ""), source=source)


def target_group(host: str, options: dict[str, str], url: str) -> Group | None:
    """A tool's target group, None for a unicast target; GroupError as for a listener."""
    if not is_multicast(host):
        if options:
            names = ", ".join(f"?{k}=" for k in options)
            raise GroupError(f"{url!r}: {names} is for a multicast group; {host} is not one")
        return None
    ttl_text, loop_text = options.get("ttl", str(DEFAULT_TTL)), options.get("loop", "1")
    if not ttl_text.isdigit() or not 0 <= int(ttl_text) <= MAX_TTL:
        raise GroupError(f"{url!r}: ttl={ttl_text!r}: give a hop limit 0-{MAX_TTL}")
    if loop_text not in ("0", "1"):
        raise GroupError(f"{url!r}: loop={loop_text!r}: give 0 or 1")
    return Group(iface=options.get("iface", ""), ttl=int(ttl_text), loop=loop_text == "1")


def ifindex(name: str) -> int:
    """The interface's index (0: the kernel's choice); GroupError when there is none."""
    if not name:
        return 0
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise GroupError(f"no network interface {name!r} here") from None


def _sockaddr(family: socket.AddressFamily, host: str) -> bytes:
    """A struct sockaddr_in/sockaddr_in6 (port 0) padded to sockaddr_storage."""
    if family == socket.AF_INET:
        raw = struct.pack("=H2s4s", socket.AF_INET, b"\0\0", socket.inet_pton(family, host))
    else:
        raw = struct.pack("=H2sI16sI", socket.AF_INET6, b"\0\0", 0,
                          socket.inet_pton(family, host), 0)  # fmt: skip
    return raw.ljust(_SOCKADDR_STORAGE, b"\0")


def join(sock: socket.socket, host: str, group: Group) -> None:
    """Join the group on the socket (bound to it); OSError when the kernel refuses,
    GroupError when the interface does not exist."""
    family = sock.family
    level = socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6
    index = ifindex(group.iface)
    # struct group_req / group_source_req: uint32 interface, then (aligned) sockaddr_storage
    head = struct.pack("=I4x", index)
    if group.source:
        req = head + _sockaddr(family, host) + _sockaddr(family, group.source)
        sock.setsockopt(level, MCAST_JOIN_SOURCE_GROUP, req)
    else:
        sock.setsockopt(level, MCAST_JOIN_GROUP, head + _sockaddr(family, host))


def prepare_sender(sock: socket.socket, group: Group) -> None:
    """The interface, hop limit and loop for what this socket sends to a group."""
    index = ifindex(group.iface)
    if sock.family == socket.AF_INET:
        if index:  # struct ip_mreqn: group (unused here), address, interface index
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, index))  # fmt: skip
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, group.ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(group.loop))
    else:
        if index:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, group.ttl)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(group.loop))


def address_key(address: str) -> tuple[int, bytes]:
    """Members' addresses in numeric order, IPv4 first (how probe and bench list them)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return (int(family), socket.inet_pton(family, address.split("%", 1)[0]))
    except OSError:
        return (99, address.encode())
