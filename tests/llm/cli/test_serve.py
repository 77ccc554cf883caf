"""`memfit serve`'s flags: a server reachable from other machines without an API key is said so on start; flags
that could never serve a request are refused at start."""
from __future__ import annotations

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


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_servers_connections_send_without_waiting_for_acks(host):
    # The listening socket must say it is TCP, or asyncio leaves Nagle on for every connection it accepts
    # (base_events._set_nodelay checks sock.proto); then a keep-alive response's body waited ~40 ms for the
    # client's delayed ACK. The option is read back from the kernel on the accepted connection.
    import asyncio
    import socket

    from memfit.llm.cli.serve import _bind

    try:
        sock = _bind(host, 0)
    except ValueError:
        pytest.skip(f"{host} is not available here")
    seen: list[int] = []

    async def main() -> None:
        async def on_client(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_client, sock=sock)
        port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection(host, port)
        await reader.read()  # the server closed it after looking
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen and seen[0] != 0
