"""What the secure listeners need, made once before binding: the TLS context (tls://,
tls+proxy://), the QUIC configuration (quic://) and the DTLS context (dtls://), from the same
``--tls-cert``/``--tls-key`` or one self-signed certificate shared by all three.

Made in the main process so a bad file is one line before anything is bound, and inherited by
``--workers`` (fork).
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from typing import Any

from socket_echo.config import DTLS_COOKIE_LIFETIME, ConfigError, ServerConfig
from socket_echo.gates.tls import (
    TlsSetupError,
    apply_ciphers,
    describe_error,
    require_client_certificates,
    self_signed_context,
    self_signed_pair,
    server_context,
)
from socket_echo.kinds import DTLS, QUIC, kind
from socket_echo.logs import logger


class CredentialsError(Exception):
    """A certificate, key or CA file unusable: one line, exit 1."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    tls: ssl.SSLContext | None = None
    quic: Any = None  # aioquic QuicConfiguration
    quic_options: Any = None  # gates.quic.QuicOptions (the client CA read once, here)
    dtls: Any = None  # pyOpenSSL SSL.Context


def check_ciphers(choice: str) -> None:
    """``--tls-ciphers`` that matches nothing: ConfigError (one line, exit 2)."""
    apply_ciphers(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), choice)


def make_credentials(cfg: ServerConfig) -> Credentials:
    kinds = [kind(spec.scheme) for spec in cfg.listeners]
    wants_tls = any(k.tls for k in kinds)
    wants_quic = any(k.served_by == QUIC for k in kinds)
    wants_dtls = any(k.served_by == DTLS for k in kinds)
    if not (wants_tls or wants_quic or wants_dtls):
        return Credentials()
    for flag, path in (
        ("--tls-cert", cfg.tls_cert),
        ("--tls-key", cfg.tls_key),
        ("--tls-client-ca", cfg.tls_client_ca),
    ):
        if path:
            check_readable(flag, path)
    pair = self_signed_pair() if cfg.tls_self_signed else None
    if pair is None and not (cfg.tls_cert and cfg.tls_key):
        which = "tls://" if wants_tls else "quic://" if wants_quic else "dtls://"
        raise ConfigError(
            f"a {which} listener needs --tls-cert and --tls-key (or --tls-self-signed)"
        )
    quic, options = quic_configuration(cfg, pair) if wants_quic else (None, None)
    return Credentials(
        tls=tls_context(cfg, pair) if wants_tls else None,
        quic=quic,
        quic_options=options,
        dtls=dtls_context(cfg, pair) if wants_dtls else None,
    )


def check_readable(flag: str, path: str) -> None:
    """A file a secure listener needs, named with its flag when it cannot be read: checked
    once here for TLS, QUIC and DTLS alike, before any library reads it its own way."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CredentialsError(f"cannot read {flag} {path}: {describe_error(exc)}") from None


def tls_context(cfg: ServerConfig, pair: tuple[Any, Any] | None = None) -> ssl.SSLContext:
    """The server's SSLContext for its TLS listeners, its suites logged."""
    if pair is not None:
        ctx, fingerprint = self_signed_context(pair)
        logger.info("TLS: self-signed certificate for localhost, SHA-256 %s", fingerprint)
        if cfg.tls_client_ca:
            try:
                require_client_certificates(ctx, cfg.tls_client_ca)
            except TlsSetupError as exc:
                raise CredentialsError(str(exc)) from None
    else:
        assert cfg.tls_cert and cfg.tls_key
        try:
            ctx = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        except TlsSetupError as exc:
            raise CredentialsError(str(exc)) from None
    suites = apply_ciphers(ctx, cfg.tls_ciphers)
    logger.info(
        "TLS: cipher suites (--tls-ciphers %s): %s%s",
        cfg.tls_ciphers,
        ", ".join(suites),
        ", client certificates required" if cfg.tls_client_ca else "",
    )
    return ctx


def quic_configuration(cfg: ServerConfig, pair: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """(QuicConfiguration, QuicOptions) for the quic:// listeners."""
    # imported here: aioquic (a tenth of a second to import) only for a quic:// listener
    from socket_echo.servers.quic import QuicSetupError, configuration, quic_options

    try:
        options = quic_options(cfg)
        quic = configuration(options, cfg.tls_cert, cfg.tls_key, pair)
    except QuicSetupError as exc:
        raise CredentialsError(str(exc)) from None
    logger.info(
        "QUIC: ALPN %s%s",
        ", ".join(cfg.quic_alpn),
        ", client certificates required" if cfg.tls_client_ca else "",
    )
    return quic, options


def dtls_context(cfg: ServerConfig, pair: tuple[Any, Any] | None) -> Any:
    # imported here: pyOpenSSL is only loaded by servers with a dtls:// listener
    from socket_echo.servers.dtls import CookieJar, DtlsSetupError, suites
    from socket_echo.servers.dtls import dtls_context as make

    cert, key = pair if pair is not None else (cfg.tls_cert, cfg.tls_key)
    cookies = CookieJar(DTLS_COOKIE_LIFETIME, time.monotonic)
    try:
        ctx = make(cert, key, cfg.tls_ciphers, cfg.tls_client_ca, cookies)
    except DtlsSetupError as exc:
        raise CredentialsError(str(exc)) from None
    logger.info(
        "DTLS 1.2: cipher suites (--tls-ciphers %s): %s%s",
        cfg.tls_ciphers,
        ", ".join(suites(ctx)),
        ", client certificates required" if cfg.tls_client_ca else "",
    )
    return ctx
