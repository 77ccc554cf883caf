"""`memfit serve`'s flags: a server reachable from other machines without an API key is said so on start; flags
that could never serve a request are refused at start."""
from __future__ import annotations

import re

import pytest

from memfit.llm.cli.serve import _check_args, exposure_warning
from memfit.cli import build_parser


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "my-host.example"])
def test_listening_beyond_this_machine_without_a_key_warns(host):
    warning = exposure_warning(host, None)
    assert warning is not None and host in warning and "--api-key" in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_do_not_warn(host):
    assert exposure_warning(host, None) is None


def test_an_api_key_silences_the_warning():
    assert exposure_warning("0.0.0.0", "secret") is None


def serve_args(*argv: str):
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"].parse_args(list(argv))


@pytest.mark.parametrize("n", [0, -1])
def test_a_waiting_limit_below_one_is_refused_at_start(n):
    # 0 used to start a server that answered every request 429, which no retry could get past.
    with pytest.raises(ValueError, match="--max-waiting must be >= 1"):
        _check_args(serve_args("--max-waiting", str(n)))
    _check_args(serve_args("--max-waiting", "1"))


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_shutdown_timeout_that_is_not_a_finite_number_is_refused_at_start(value):
    # nan passed the `< 0` check and inf was an OverflowError traceback when the server was configured
    with pytest.raises(ValueError, match="--shutdown-timeout must be a finite number"):
        _check_args(serve_args("--shutdown-timeout", value))
    _check_args(serve_args("--shutdown-timeout", "0"))


def test_a_timeline_path_that_cannot_be_written_is_refused_at_start(tmp_path):
    (tmp_path / "afile").write_text("kept")
    for path in (str(tmp_path), str(tmp_path / "afile" / "x.jsonl"), str(tmp_path / "tl.png")):
        with pytest.raises(ValueError, match="--timeline"):
            _check_args(serve_args("--timeline", path))
    assert (tmp_path / "afile").read_text() == "kept"


def _has_ipv6() -> bool:
    """Whether this host can listen on ::1 (no IPv6 in the kernel, or no loopback address for it: not)."""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this host")


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_the_servers_connections_send_without_waiting_for_acks(host):
    # The listening socket must say it is TCP, or asyncio leaves Nagle on for every connection it accepts
    # (base_events._set_nodelay checks sock.proto); then a keep-alive response's body waited ~40 ms for the
    # client's delayed ACK. The option is read back from the kernel on the accepted connection.
    import asyncio
    import socket

    from memfit.llm.cli.serve import _bind

    sock = _bind(host, 0)  # where the family is there, binding must work: a failure here is a failure
    seen: list[int] = []

    async def main() -> None:
        async def on_client(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_client, sock=sock)
        try:
            port = sock.getsockname()[1]
            reader, writer = await asyncio.open_connection(host, port)
            await reader.read()  # the server closed it after looking
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), timeout=30))  # a hang guard, not a speed check
    assert seen and seen[0] != 0


@needs_ipv6
def test_a_bracketed_ipv6_address_binds_as_the_bare_one():
    """--host [::1] (as in a URL) picked IPv6 and then failed with the resolver's 'Name or service not known'."""
    import socket

    from memfit.llm.cli.serve import _bind

    for host in ("::1", "[::1]"):
        with _bind(host, 0) as sock:
            assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1", host
            assert sock.proto == socket.IPPROTO_TCP, host  # what makes asyncio set TCP_NODELAY


def test_a_name_is_bound_in_the_family_it_resolves_to(monkeypatch):
    """The family came from ':' in the host, so a name with only an IPv6 address was bound as IPv4; it is the
    resolver's now (here `localhost`, said to be ::1 only, which is skipped where ::1 cannot be bound)."""
    import socket

    from memfit.llm.cli.serve import _bind

    if not _has_ipv6():
        pytest.skip("no IPv6 loopback on this host")
    real = socket.getaddrinfo

    def v6_only(host, port, *a, **k):
        return real("::1" if host == "localhost" else host, port, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", v6_only)
    with _bind("localhost", 0) as sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"


@pytest.mark.parametrize("host", ["nohost.invalid", "a..b", "[::1"])
def test_a_host_that_cannot_be_resolved_is_the_listen_error(host):
    """A name the resolver does not know (.invalid never resolves, RFC 6761), one that is no valid name at all
    (idna refuses 'a..b' before any lookup): the one 'cannot listen on' message, not a traceback."""
    from memfit.llm.cli.serve import _bind

    with pytest.raises(ValueError, match=rf"^cannot listen on {re.escape(host)}:0: .+; pick another --port or "
                                         "--host$"):
        _bind(host, 0)


def test_a_family_this_host_lacks_is_the_listen_error_not_a_traceback(monkeypatch):
    """On a host without IPv6, `--host ::` failed in socket.socket(), outside the try: an OSError traceback."""
    import errno
    import socket

    from memfit.llm.cli.serve import _bind

    class NoIPv6(socket.socket):
        def __init__(self, family=-1, *a, **k):
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *a, **k)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    with pytest.raises(ValueError, match=r"^cannot listen on \[::\]:0: Address family not supported by protocol; "
                                         "pick another --port or --host$"):
        _bind("::", 0)
