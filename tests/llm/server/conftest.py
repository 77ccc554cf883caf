from __future__ import annotations

import pytest

from memfit.llm.server.app import ServerSettings
from tests.llm.server.live import API_KEY, LiveServer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from tests.llm.tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("serve"), family="llama")


@pytest.fixture(scope="session")
def server(model_dir):
    """The shared server: API key on, a roomy KV budget."""
    settings = ServerSettings(model_name="tiny", aliases=(str(model_dir),), api_key=API_KEY, max_body_bytes=64 * 1024)
    with LiveServer(model_dir, settings, max_waiting=64) as live:
        yield live
