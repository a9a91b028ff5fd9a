"""The SmolLM2 server and ``openai`` client that the real-client server tests share (tool calls, the
Responses API, prompt scores and lm-eval): ``srv, client = openai_server()`` at a test module's top
gives that module its own module-scoped ``srv`` (url, server, backend) and ``client`` fixtures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

MODEL = "smollm2-135m"


def openai_server(**app_options):
    """(``srv``, ``client``) fixtures: a server on the session's SmolLM2 backend (``create_app`` with
    ``app_options``), stopped after the module with no KV handle left open, and an ``openai`` client."""

    @pytest.fixture(scope="module")
    def srv(smollm):
        from decodekit.servers.openai.app import ServerThread, create_app

        from decodekit.api import LLM

        app = create_app(LLM(backend=smollm), model_name=MODEL, **{"max_queue": 64, **app_options})
        thread = ServerThread(app).start()
        yield SimpleNamespace(url=thread.url, server=app.state.server, backend=smollm)
        thread.stop()
        assert smollm.cache.num_open_handles == 0

    @pytest.fixture(scope="module")
    def client(srv):
        import openai

        return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=600)

    return srv, client
