"""The addresses a user gives the server, parsed: ``--bind`` URLs (``tcp://HOST:PORT``,
``tcp://[V6]:PORT``, ``unix:///PATH``, with impairments in the query), ``--host``/``--port``
and ``--metrics HOST:PORT`` -> config.ListenerSpec; ConfigError (one line) when malformed."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from socket_echo.config import DEFAULT_HOSTS, ConfigError, ListenerSpec, check_port
from socket_echo.groups import (
    LISTENER_OPTIONS,
    GroupError,
    is_multicast,
    listener_group,
    split_query,
)
from socket_echo.impair.params import ImpairmentError
from socket_echo.impair.params import parse as parse_impairments
from socket_echo.kinds import DEFAULT_PORT, KINDS, SCHEMES, kind


def parse_bind_url(url: str) -> ListenerSpec:
    """``tcp://HOST:PORT`` or ``tcp://[V6]:PORT`` -> ListenerSpec; ConfigError when malformed."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigError(f"malformed --bind {url!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"malformed --bind {url!r}: unknown scheme (use {known})")
    query, options = parts.query, dict[str, str]()
    if kind(parts.scheme).groups:  # a group's options beside the impairments (groups.py)
        options, query = split_query(query, LISTENER_OPTIONS)
    try:
        impair = parse_impairments(query, parts.scheme, url)
    except ImpairmentError as exc:
        raise ConfigError(str(exc)) from None
    if kind(parts.scheme).unix:
        path = parts.netloc + parts.path
        if not path.startswith("/"):
            raise ConfigError(f"malformed --bind {url!r}: use unix:///absolute/path")
        return ListenerSpec(parts.scheme, "", 0, path, impair)
    if "@" in parts.netloc:
        raise ConfigError(f"malformed --bind {url!r}: a listener has no user (HOST:PORT only)")
    if not parts.hostname:
        raise ConfigError(f"malformed --bind {url!r}: no host (e.g. tcp://127.0.0.1:4242)")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"malformed --bind {url!r}: unexpected path")
    host = parts.hostname
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"malformed --bind {url!r}: {host!r} is not an IPv6 address"
            ) from None
    try:
        group = listener_group(host, options, url) if kind(parts.scheme).groups else None
    except GroupError as exc:
        raise ConfigError(str(exc)) from None
    if group is None and is_multicast(host):
        joins = ", ".join(f"{k.scheme}://" for k in KINDS.values() if k.groups)
        raise ConfigError(f"--bind {url!r}: a multicast group is joined by {joins} listeners only")
    port = DEFAULT_PORT if port is None else port
    return ListenerSpec(parts.scheme, host, port, "", impair, group)


def listeners_from_hosts(hosts: tuple[str, ...], port: int) -> tuple[ListenerSpec, ...]:
    """TCP and UDP on each host, as RFC 862 and Zephyr's echo_server do."""
    check_port(port)
    return tuple(
        ListenerSpec(scheme, host, port)
        for scheme in ("tcp", "udp")
        for host in (hosts or DEFAULT_HOSTS)
    )


def parse_metrics_address(text: str) -> ListenerSpec:
    """``HOST:PORT`` or ``[V6]:PORT`` for the metrics and health endpoint (port required)."""
    if not text.rsplit("]", 1)[-1].count(":"):
        raise ConfigError(f"--metrics {text!r}: give HOST:PORT (e.g. 127.0.0.1:9100)")
    port = text.rsplit(":", 1)[1]
    if port.isdigit() and int(port) > 65535:
        raise ConfigError(f"--metrics {text!r}: port {port} is out of range (0-65535)")
    try:
        spec = parse_bind_url(f"tcp://{text}")
    except ConfigError:
        raise ConfigError(f"--metrics {text!r}: give HOST:PORT (e.g. 127.0.0.1:9100)") from None
    return spec
