"""`memfit serve`'s flags: a server reachable from other machines without an API key is said so on start."""
from __future__ import annotations

import pytest

from memfit.llm.cli.serve import exposure_warning


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "my-host.example"])
def test_listening_beyond_this_machine_without_a_key_warns(host):
    warning = exposure_warning(host, None)
    assert warning is not None and host in warning and "--api-key" in warning


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_addresses_do_not_warn(host):
    assert exposure_warning(host, None) is None


def test_an_api_key_silences_the_warning():
    assert exposure_warning("0.0.0.0", "secret") is None
