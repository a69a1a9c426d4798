"""The listener kinds' table (kinds.py) is the one place scheme names are told apart on the
server side: every scheme --bind accepts has a kind, and no server module compares a scheme
with a string literal (the client-side target parser and the tools may: they parse TARGET)."""

from __future__ import annotations

import ast
import pathlib

import pytest
from test_imports import SRC, import_graph

from socket_echo import binds, config
from socket_echo.kinds import KINDS, SCHEMES, TARGET_SCHEMES, kind
from socket_echo.tools.connect.target import parse_target

PACKAGE = SRC / "socket_echo"
# Client side: parses and dispatches on TARGET, not on a listener.
CLIENT_SIDE = ("tools/", "cli.py")


def scheme_comparisons(path: pathlib.Path, base: pathlib.Path = PACKAGE) -> list[str]:
    """``x.scheme == "tcp"``, ``scheme in ("tcp", "unix")`` and the like, as 'file:line'."""
    found = []

    def literal(node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(literal(e) for e in node.elts)
        return False

    def names_scheme(node: ast.expr) -> bool:
        return getattr(node, "attr", getattr(node, "id", None)) == "scheme"

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(names_scheme(s) for s in sides) and any(literal(s) for s in sides):
                found.append(f"{path.relative_to(base)}:{node.lineno}")
    return found


def test_no_server_module_compares_scheme_strings():
    offenders = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "kinds.py" and not str(path.relative_to(PACKAGE)).startswith(CLIENT_SIDE)
        for hit in scheme_comparisons(path)
    ]
    assert offenders == []


def test_the_scan_finds_a_comparison(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "def f(b, scheme):\n"
        "    if b.scheme == 'unix':\n"
        "        pass\n"
        "    return scheme in ('tcp', 'unix')\n"
    )
    assert scheme_comparisons(source, tmp_path) == ["mod.py:2", "mod.py:4"]


def test_kinds_is_a_leaf():
    assert import_graph()["socket_echo.kinds"] == set()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_parses_as_a_bind_url_and_has_its_kind(scheme):
    url = f"{scheme}:///tmp/x.sock" if kind(scheme).unix else f"{scheme}://127.0.0.1:5000"
    spec = binds.parse_bind_url(url)
    assert spec.scheme == scheme
    assert config.format_url(spec.scheme, spec.host, spec.port, spec.path) == url


def test_an_unknown_scheme_is_refused_naming_every_kind():
    with pytest.raises(config.ConfigError) as err:
        binds.parse_bind_url("sctp://127.0.0.1:5000")
    for scheme in SCHEMES:
        assert f"{scheme}://" in str(err.value)


@pytest.mark.parametrize("scheme", TARGET_SCHEMES)
def test_the_tools_reach_every_target_kind_on_its_default_port(scheme):
    k = KINDS[scheme]
    if k.unix:
        assert parse_target("unix:///tmp/x.sock").path == "/tmp/x.sock"
        return
    target = parse_target(f"{scheme}://127.0.0.1")
    assert (target.scheme, target.port, target.stream) == (scheme, k.default_port, not k.datagram)


def test_the_engine_rule():
    assert kind("tcp").takes_engine(impaired=False) and kind("unix").takes_engine(False)
    assert not kind("tcp").takes_engine(impaired=True)
    assert not any(kind(s).takes_engine(False) for s in ("tls", "tcp+proxy", "tls+proxy"))
    assert kind("quic").default_port == 4422  # Zephyr's QUIC echo samples
