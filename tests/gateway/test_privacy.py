"""Confidential means confidential: no prompt, completion or key in any log line or on stdout."""

from __future__ import annotations

import openai
import pytest

from tests.support.clients import sdk
from tests.support.gateway_proc import start_gateway
from tests.support.sandbox_proc import start_sandbox
from tests.support.testdata import TEE, TEST_MODELS

PROMPT_MARKER = "PROMPT-MARKER-7d2c91"
KEY_MARKER = "KEY-MARKER-5b8e04"


def test_no_prompt_completion_or_key_reaches_the_log():
    with (
        start_sandbox("--models", str(TEST_MODELS)) as up,
        start_gateway(up.base_url, extra_toml='log.level = "debug"') as gw,
    ):
        client = sdk(gw)
        with pytest.raises(openai.AuthenticationError), sdk(gw, f"vgpu_sk_{KEY_MARKER}") as bad:
            bad.chat.completions.create(model=TEE, messages=[{"role": "user", "content": "x"}])
        msg = [{"role": "user", "content": f"tell me about {PROMPT_MARKER}"}]
        client.chat.completions.create(model=TEE, messages=msg)
        list(client.chat.completions.create(model=TEE, messages=msg, stream=True))
        for bad in (
            {"model": "not/confidential", "messages": msg},
            {"model": TEE, "messages": msg, "temperature": 9},
            {"model": TEE, "messages": [{"role": PROMPT_MARKER, "content": PROMPT_MARKER}]},
        ):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(**bad)
        up.behaviour(status=500)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=TEE, messages=msg)
        gw.stop()
        log = gw.log_text()
        output = gw.output_text()  # the stderr log and every stdout line
    assert '"event": "request"' in log  # the access log is there...
    assert "TEEGATE RUNNING" in output  # ...and so is stdout...
    for secret in (PROMPT_MARKER, KEY_MARKER, gw.api_key, "Sandbox reply", up.api_key):
        assert secret not in output  # ...and neither holds any of these
