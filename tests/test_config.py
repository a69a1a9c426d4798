"""ServerConfig's own rules (__post_init__): a config made by a program is held to what the
CLI holds it to."""

from __future__ import annotations

import pytest

from socket_echo import config


def test_a_programmatic_config_keeps_the_rules_the_cli_keeps():
    """ServerConfig.__post_init__: made by a program, the same rules as from the CLI."""
    from socket_echo.config import ListenerSpec, ServerConfig

    quiet = ServerConfig(log_level="WARNING", access_log=True)
    assert (quiet.log_level, quiet.access_log) == ("warning", False)  # no level to show them
    assert ServerConfig(log_level="info").access_log is True
    with pytest.raises(config.ConfigError, match="port 70000 is out of range"):
        ServerConfig(listeners=(ListenerSpec("tcp", "127.0.0.1", 70000),))
    with pytest.raises(config.ConfigError, match="1 to 255 bytes"):
        ServerConfig(quic_alpn=("",))
    assert ServerConfig(listeners=(ListenerSpec("unix", "", 0, "/tmp/x.sock"),)).listeners
