"""The playground page at ``/``, driven in headless Chromium (Debian's package, through Playwright):
for a plain, a speculative, a constrained (JSON schema), an entropy-switch, a tree-rollout and an
SMC request, the rendered tokens and their provenance classes equal what the API returns for the
same seeded request; no request leaves loopback; screenshots of each view go to
``$DECODEKIT_SCREENSHOTS`` (``bench/results/playground/`` when refreshing the README's images)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import jsonschema
import pytest
from decodekit.servers.openai.app import ServerThread, create_app

from decodekit.api import LLM
from decodekit.backends.hf import HFBackend
from decodekit.types import SOURCES

pytestmark = pytest.mark.real

KEY = "page-key"
MODEL = "smollm2-135m"
CHROMIUM = os.environ.get("DECODEKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def page_server(smollm):
    # the "small" model: the same weights in a backend of its own (an int8 copy's dynamic activation scales
    # change with the prefill chunking, so a cached and an uncached run could differ)
    small = HFBackend(smollm.model, smollm.tokenizer, name="smollm2-135m-copy", cache_tokens=4096)
    app = create_app(LLM(backend=smollm, max_batch_size=16), model_name=MODEL, api_key=KEY,
                     models={small.name: small}, small_model=small.name)
    thread = ServerThread(app).start()
    yield thread.url
    thread.stop()
    assert smollm.cache.num_open_handles == 0


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium found: apt-get install chromium (or set DECODEKIT_CHROMIUM)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, page_server, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen, errors = [], []
    page.route("**/*", lambda route: (seen.append(route.request.url), route.continue_()))
    # the page's first model lookup runs before the key is typed: its 401 is expected
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server + "/")
    page.fill("#api_key", KEY)
    page.dispatch_event("#api_key", "change")
    page.wait_for_selector("#model:has-text('smollm2')")  # a selector: the page's CSP forbids wait_for_function
    yield page
    assert seen and all(url.startswith(page_server + "/") for url in seen), seen  # loopback only
    assert not errors, errors
    context.close()


def screenshot(page, name: str) -> None:
    folder = Path(os.environ.get("DECODEKIT_SCREENSHOTS", "/tmp/decodekit-playground"))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def run_on_page(page, **fields) -> list[list[dict]]:
    """Fill the form, run, wait, and read back each rendered choice's tokens (id, provenance class)."""
    for key, value in fields.items():
        if key in ("strategy", "constraint_kind", "sampler"):
            page.select_option(f"#{key}", value)
        else:
            page.fill(f"#{key}", str(value))
    page.click("#run")
    page.wait_for_selector("#status[data-state='done'], #status[data-state='error']", timeout=300_000)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#status")
    return page.eval_on_selector_all("#output .choice", """boxes => boxes.map(box =>
        [...box.querySelectorAll('.tok')].map(t => ({id: Number(t.dataset.id), source: t.dataset.source,
                                                     cls: t.className, text: t.textContent})))""")


def api_tokens(url: str, body: dict) -> tuple[dict, list[list[dict]]]:
    """The same request, whole (not streamed), straight to the API."""
    body = {**body, "stream": False}
    body.pop("stream_options", None)
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    return out, [choice["decodekit"]["tokens"] for choice in out["choices"]]


def same_tokens(rendered: list[list[dict]], expected: list[list[dict]]) -> None:
    assert [[(t["id"], t["source"]) for t in c] for c in rendered] == \
           [[(t["id"], t["source"]) for t in c] for c in expected]
    for choice in rendered:
        for t in choice:
            assert t["source"] in SOURCES and f"src-{t['source']}" in t["cls"].split()


def check_view(page, url: str, name: str, **fields) -> tuple[dict, list[list[dict]]]:
    rendered = run_on_page(page, **fields)
    request = page.evaluate("window.playground.lastRequest")
    assert request["decodekit"]["provenance"] is True
    response, expected = api_tokens(url, request)
    same_tokens(rendered, expected)
    screenshot(page, name)
    return response, expected


def sources(tokens: list[list[dict]]) -> set[str]:
    return {t["source"] for choice in tokens for t in choice}


def test_plain(page, page_server):
    _, tokens = check_view(page, page_server, "plain", prompt="Name three colours.", max_tokens=24, temperature=0.8,
                           seed=3)
    assert sources(tokens) == {"sampled"} and len(tokens[0]) > 5


def test_speculative(page, page_server):
    prompt = "Repeat exactly: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."
    response, tokens = check_view(page, page_server, "speculative", strategy="speculative", draft="ngram",
                                  prompt=prompt, max_tokens=32, temperature=0)
    counts = sum(t["source"] == "draft_accepted" for t in tokens[0])
    assert counts == response["decodekit"]["tokens_accepted"] > 0
    assert "accepted drafts" in page.inner_text("#readout")


def test_constrained_json_schema(page, page_server):
    response, tokens = check_view(page, page_server, "constrained", strategy="plain", constraint_kind="json",
                                  constraint_text=json.dumps(SCHEMA), sampler="masked", particles=1,
                                  prompt="Give a person as JSON.", max_tokens=48, temperature=0.7, seed=1)
    jsonschema.validate(json.loads(response["choices"][0]["message"]["content"]), SCHEMA)
    assert "forced" in sources(tokens)
    assert all(t["checks"] >= 1 for t in tokens[0])
    assert "checks/token" in page.inner_text("#readout")


def test_entropy_switch(page, page_server):
    _, tokens = check_view(page, page_server, "entropy", strategy="entropy", threshold=1.5,
                           prompt="What is the capital of France?", max_tokens=32, temperature=0)
    assert sources(tokens) <= {"small", "large"} and tokens[0]
    assert all("entropy" in t for t in tokens[0])


def test_tree_rollout(page, page_server):
    response, tokens = check_view(page, page_server, "tree", strategy="tree", tree_width=4, segment_len=8,
                                  prompt="Tell me a fact about owls.", max_tokens=24, temperature=1.0, seed=2)
    assert len(tokens) == 4
    assert page.locator("#tree circle.leaf").count() == len(response["decodekit"]["rollout"]["trajectories"])
    nodes = {n["node_id"]: n for n in response["decodekit"]["rollout"]["nodes"]}
    for choice, trajectory in zip(tokens, response["decodekit"]["rollout"]["trajectories"]):
        assert [t["id"] for t in choice] == [i for n in trajectory["path"] for i in nodes[n]["token_ids"]]


def test_smc_particles(page, page_server):
    response, tokens = check_view(page, page_server, "smc", strategy="plain", constraint_kind="regex",
                                  constraint_text="(yes|no), because [a-z ]{5,30}\\.", sampler="awrs", particles=4,
                                  prompt="Is the sky blue? Answer yes or no with a reason.", max_tokens=24,
                                  temperature=1.0, seed=4)
    steps = len(response["decodekit"]["smc_trace"]["log_weights"])
    assert page.locator("#particles_view circle.particle").count() == 4 * steps
    assert page.locator("#particles_view line.ancestry").count() == 4 * response["decodekit"]["resampling_events"]


def test_page_needs_the_key(browser, page_server):
    page = browser.new_page()
    page.goto(page_server + "/")
    page.wait_for_selector("#status[data-state='error']")
    assert "401" in page.inner_text("#status")
    page.close()
    assert httpx.get(page_server + "/static/../app.py").status_code == 404
    assert "decodekit playground" in httpx.get(page_server + "/").text
