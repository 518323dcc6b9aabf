"""docs/gateway.md matches the gateway: its examples work as written (the key setup, the curl request and the
openai client, run from the document's own text against a gateway in front of the real pipeline), every route
it lists answers on that gateway, its settings table is exactly the gateway's settings, and its error table
names exactly the error codes the gateway's code gives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from gateway_stack import GatewayPipeline, gateway_pipeline

from gateway.auth import key_digest
from lodestar.settings import PROJECT_ROOT, GatewaySettings

pytestmark = pytest.mark.integration

DOC = PROJECT_ROOT / "docs" / "gateway.md"
KEY = "sk-docs-example"


def section(title: str) -> str:
    """The text of docs/gateway.md under a `#`-heading `title`, up to the next heading of any level."""
    found = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", DOC.read_text() + "\n#", re.DOTALL | re.MULTILINE)
    assert found, f"docs/gateway.md has no section {title!r}"
    return found.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in `text`, as cells."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r[0] and not set(r[0]) <= {"-", " "} and r[0] not in {"route", "setting", "status"}]


def example(name: str) -> str:
    """The code block under `<!-- example: NAME -->` in docs/gateway.md."""
    found = re.search(rf"<!-- example: {name} -->\n```\w+\n(.*?)\n```", DOC.read_text(), re.DOTALL)
    assert found, f"docs/gateway.md has no example {name!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def pipe(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayPipeline]:
    with gateway_pipeline(tmp_path_factory.mktemp("gateway-docs"), api_key=KEY) as running:
        yield running


def run(argv: list[str], pipe: GatewayPipeline) -> str:
    env = {**os.environ, "LODESTAR_GATEWAY": pipe.urls[0], "LODESTAR_API_KEY": KEY}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_key_setup_stores_the_keys_digest() -> None:
    script = example("keys") + '\nprintf "%s\\n%s" "$LODESTAR_API_KEY" "$LODESTAR_GATEWAY__API_KEY_HASHES"'
    key, hashes = subprocess.run(["bash", "-ec", script], capture_output=True, text=True, check=True).stdout.split("\n")
    assert key.startswith("sk-") and json.loads(hashes) == [key_digest(key)]


def test_the_curl_example_streams_a_chat(pipe: GatewayPipeline) -> None:
    out = run(["bash", "-ec", example("curl")], pipe)
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()


def test_the_openai_example_streams_a_chat(pipe: GatewayPipeline) -> None:
    out = run([sys.executable, "-c", example("openai")], pipe)
    text, usage = out.rstrip("\n").rsplit("\n", 1)
    assert text.strip() and usage == "[16 tokens]"


def test_every_documented_route_answers(pipe: GatewayPipeline) -> None:
    routes = []
    for cells in table_rows(section("The API")):
        first, *more = re.findall(r"`([^`]+)`", cells[0])
        method, path = first.split(" ")
        routes += [(method, path) for path in (path, *more)]
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/completions", "/generate", "/v1/models",
                                      "/health", "/healthz", "/readyz", "/metrics"}
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path in routes:
        url = pipe.urls[0] + path.replace("{id}", "meta-llama/Llama-3.1-8B-Instruct")
        answer = httpx.request(method, url, headers=headers, json={} if method == "POST" else None, timeout=30)
        # an empty body is a 400 naming what is missing; a route that did not exist would be a 404 or 405
        assert answer.status_code == (400 if method == "POST" else 200), (method, path, answer.text)
    assert httpx.get(pipe.urls[0] + "/v1/nothing", headers=headers, timeout=30).status_code == 404


def test_the_settings_table_is_the_gateways_settings() -> None:
    documented = {name.strip("` ").removeprefix("gateway.") for cells in table_rows(section("Settings"))
                  for name in cells[0].split(",")}
    assert documented == set(GatewaySettings.model_fields)
    mentioned = set(re.findall(r"`gateway\.([a-z_]+)`", DOC.read_text()))
    assert mentioned <= set(GatewaySettings.model_fields), mentioned - set(GatewaySettings.model_fields)


def test_the_error_table_names_every_code_the_gateway_gives() -> None:
    documented = {code.strip("` ") for cells in table_rows(section("Errors")) for code in cells[2].split(",")}
    sources = "\n".join(f.read_text() for f in (PROJECT_ROOT / "gateway").glob("*.py"))
    given = set(re.findall(r'code="([a-z_]+)"', sources))
    # the codes of a pipeline's result and of starlette's routing errors, from their tables in the code
    for table in re.findall(r"code = \{([^}]*)\}", sources):
        given |= set(re.findall(r'\d{3}: "([a-z_]+)"', table))
    assert documented == given
