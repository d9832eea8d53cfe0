"""`claude-runtime fake-api` as a user starts it, answering the real SDK."""

import socket
import subprocess
import sys
import time

import anthropic
import httpx2
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    billing = tmp_path_factory.mktemp("cli") / "billing.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "fake-api", "--port", str(port), "--rpm", "3",
                             "--itpm", "100000", "--otpm", "100000", "--billing", str(billing),
                             "--output-tokens-per-s", "5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="any-key", max_retries=0)
    deadline = time.time() + 60
    while True:
        try:
            client.messages.count_tokens(model="claude-haiku-5-5", messages=[{"role": "user", "content": "x"}])
            break
        except anthropic.APIConnectionError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(proc.stdout.read().decode()[-2000:])
            time.sleep(0.2)
    yield client, billing, port
    proc.terminate()
    proc.wait(10)


def test_cli_server_answers_bills_rate_limits_and_validates(server):
    client, billing, port = server
    msg = client.messages.create(model="claude-haiku-5-5", max_tokens=32,
                                 messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text and msg.usage.input_tokens > 0
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="claude-haiku-5-5", max_tokens=8, extra_body={"temperature": 0.5},
                               messages=[{"role": "user", "content": "hi"}])
    for _ in range(2):
        client.messages.create(model="claude-haiku-5-5", max_tokens=8, messages=[{"role": "user", "content": "a"}])
    with pytest.raises(anthropic.RateLimitError) as exc:  # --rpm 3: the fourth request in a minute
        client.messages.create(model="claude-haiku-5-5", max_tokens=8, messages=[{"role": "user", "content": "b"}])
    headers = exc.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["anthropic-ratelimit-requests-limit"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    lines = billing.read_text().splitlines()
    assert len(lines) == 3 and msg.id in lines[0]


def test_cli_sets_the_generation_speed(server):
    _, _, port = server
    cfg = httpx2.post(f"http://127.0.0.1:{port}/_fake/config", json={}).json()
    assert cfg["output_tokens_per_s"] == 5000
