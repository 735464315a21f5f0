"""Fixtures shared by the test files. Keep this small and generic."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner


class NetworkBlocked(RuntimeError):
    """Raised by any attempt to open a socket while the network is blocked."""


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Make every new socket or connection fail, so a test cannot reach the network."""

    def refuse(*args, **kwargs):
        raise NetworkBlocked("a test tried to open a network connection")

    mp.setattr(socket, "socket", refuse)
    mp.setattr(socket, "create_connection", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def check_one_line_error(result, code: int = 2, *needles: str) -> str:
    """A failed run as every failure must look: exit `code`, nothing on stdout, exactly one
    line `attn: error: …` on stderr, containing each of `needles`. Returns that line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def one_line_error():
    return check_one_line_error


@pytest.fixture
def fresh_encoding():
    """Forget the cached GPT-2 encoding before and after, so the test really builds it."""
    from attn_tracer.model import tokens

    tokens.encoding.cache_clear()
    yield
    tokens.encoding.cache_clear()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per session) a small transformers checkpoint: see helpers/checkpoints.py."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from helpers.checkpoints import Checkpoints

    return Checkpoints(tmp_path_factory.mktemp("hf"))
