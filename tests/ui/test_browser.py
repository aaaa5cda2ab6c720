"""The page and the API docs in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
download), with every request that would leave the test server blocked and recorded (issue 16).

Screenshots go to ``.artifacts/browser/`` in the repository (or ``$SYNAPSE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright import sync_api as playwright_api

from conftest import LiveServer
from synapse_client import SynapseClient


ALICE, BOB, ROOT = "alice-" + "a" * 24, "bob-" + "b" * 24, "root-" + "r" * 24
ARTIFACTS = Path(os.environ.get("SYNAPSE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts")) / "browser"
TIMEOUT_MS = 30_000


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium on this machine: install Debian's chromium (scripts/test.sh and .ci/run do, as root)")


@pytest.fixture(scope="module")
def browser(server):
    """Chromium, started after the module's server and so closed before it: a server stopping under the browser's
    kept-alive connections waited 30 s for them at the end of the module."""
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


class Offline:
    """A page whose requests may only go to ``origin``: anything else is aborted and remembered."""

    def __init__(self, browser, origin: str) -> None:
        self.origin, self.outside, self.errors = origin, [], []
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.origin + "/") or url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Offline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("browser"),
                    tokens=f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin") as live:
        yield live


@pytest.fixture(scope="module")
def instances(server):
    """alice's two instances and bob's one, each evolved once."""
    rng = np.random.default_rng(0)
    with SynapseClient(server.url, token=ALICE) as alice, SynapseClient(server.url, token=BOB) as bob:
        enc = alice.create("alice-enc", kind="HebbianDeconvSynapse",
                           config={"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.5})
        dense = alice.create("alice-dense", kind="HebbianSynapse", config={"shape": [16, 4], "eta": 0.2})
        secret = bob.create("bob-secret-net", kind="HebbianSynapse", config={"shape": [9, 2]})
        enc.evolve(rng.random((2, 8, 8, 1), np.float32), rng.random((2, 8, 8, 4), np.float32))
        dense.evolve(rng.random((2, 16), np.float32), rng.random((2, 4), np.float32))
        secret.evolve(rng.random((1, 9), np.float32), rng.random((1, 2), np.float32))
        yield {"enc": enc, "dense": dense, "secret": secret}


def sign_in(offline: Offline, url: str, token: str | None) -> None:
    offline.page.goto(url + "/")  # redirects to /ui
    assert offline.page.url == url + "/ui"
    if token is not None:
        offline.page.fill("#token", token)
        offline.page.click("#use-token")


def card_image(offline: Offline, instance: str) -> np.ndarray:
    image = offline.page.locator(f'article[data-instance="{instance}"] img.filters')
    image.wait_for(state="visible")
    offline.page.wait_for_function(
        "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }",
        arg=f'article[data-instance="{instance}"] img.filters')
    return np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("RGB"))


@pytest.mark.parametrize("path, ready, fragment", [
    ("/docs", ".opblock", "Create a named instance"),
    ("/redoc", "[data-section-id*='operation/']", "Create a named instance"),
])
def test_the_api_docs_render_their_operations_with_the_network_blocked(browser, server, path, ready, fragment):
    with Offline(browser, server.url) as offline:
        offline.page.goto(server.url + path)
        offline.page.wait_for_selector(ready, state="attached")
        offline.page.get_by_text(fragment).first.wait_for(state="attached")
        operations = offline.page.locator(ready).count()
        assert operations >= 20, f"{path} lists {operations} operations"
        offline.screenshot(path.strip("/"))
        assert offline.outside == [], f"{path} tried to fetch from outside: {offline.outside}"
        assert offline.errors == []


def test_the_page_shows_an_owners_instances_pictures_and_curves_and_nothing_else(browser, server, instances):
    with Offline(browser, server.url) as offline:
        sign_in(offline, server.url, None)
        offline.page.wait_for_selector("#status.error")
        assert "token" in offline.page.inner_text("#status")  # auth is on: the page asks for one
        offline.page.fill("#token", ALICE)
        offline.page.click("#use-token")
        rows = offline.page.locator("#instances tbody tr")
        offline.page.wait_for_function("() => document.querySelectorAll('#instances tbody tr').length === 2")
        owners_and_names = sorted(rows.nth(i).get_attribute("data-instance") for i in range(rows.count()))
        assert owners_and_names == ["alice/alice-dense", "alice/alice-enc"]
        enc_row = offline.page.locator('#instances tr[data-instance="alice/alice-enc"] td')
        assert [enc_row.nth(i).inner_text() for i in (0, 2, 3, 5)] == ["alice", "HebbianDeconvSynapse", "cpu:0",
                                                                      "evolve 1"]
        before = card_image(offline, "alice/alice-enc")
        assert before.std() > 0, "the filters picture is blank"
        offline.page.wait_for_selector('article[data-instance="alice/alice-enc"] svg.history[data-field="norm"]'
                                        '[data-points="1"] polyline', state="attached")
        stats_row = offline.page.locator('article[data-instance="alice/alice-enc"] tr[data-stat="weights"]')
        mean_text = stats_row.locator('td[data-field="mean"]').inner_text()
        weights = instances["enc"].weights
        assert float(mean_text) == pytest.approx(float(weights.astype(np.float64).mean()), rel=1e-3)
        offline.screenshot("ui-alice-before")

        rng = np.random.default_rng(1)
        for _ in range(3):  # learning while the page is open: it refreshes by itself
            instances["enc"].evolve(rng.random((2, 8, 8, 1), np.float32), rng.random((2, 8, 8, 4), np.float32))
        version = instances["enc"].describe()["version"]
        offline.page.wait_for_selector(f'article[data-instance="alice/alice-enc"] img.filters[data-version="{version}"]')
        offline.page.wait_for_selector('article[data-instance="alice/alice-enc"] svg.history[data-field="norm"]'
                                        '[data-points="4"]')
        after = card_image(offline, "alice/alice-enc")
        assert after.shape == before.shape and not np.array_equal(after, before), "the picture did not change"
        offline.screenshot("ui-alice-after")

        html = offline.page.content()
        assert "bob-secret-net" not in html and "bob/" not in html
        assert offline.outside == [] and offline.errors == []


def test_switching_tokens_drops_what_the_last_token_saw_and_an_admin_sees_everyone(browser, server, instances):
    with Offline(browser, server.url) as offline:
        sign_in(offline, server.url, ALICE)
        offline.page.wait_for_selector('article[data-instance="alice/alice-enc"]')
        offline.page.fill("#token", BOB)
        offline.page.click("#use-token")
        offline.page.wait_for_selector('article[data-instance="bob/bob-secret-net"] img.filters[data-version]')
        html = offline.page.content()
        assert "alice-enc" not in html and "alice-dense" not in html
        offline.page.fill("#token", ROOT)
        offline.page.click("#use-token")
        offline.page.wait_for_function("() => document.querySelectorAll('#instances tbody tr').length === 3")
        offline.page.wait_for_selector('article[data-instance="bob/bob-secret-net"] img.filters[data-version]')
        offline.page.wait_for_selector('article[data-instance="alice/alice-dense"] img.filters[data-version]')
        offline.screenshot("ui-admin")
        stored = offline.page.evaluate("() => sessionStorage.getItem('synapse-serve-token')")
        assert stored == ROOT
        offline.page.click("#forget-token")
        offline.page.wait_for_selector("#status.error")
        assert offline.page.locator("#instances tbody tr").count() == 0
        assert offline.page.locator("article.card").count() == 0
        assert offline.outside == [] and offline.errors == []


def test_the_page_works_with_auth_off(browser, tmp_path):
    with LiveServer(state_dir=tmp_path) as live, SynapseClient(live.url) as client:
        client.create("open-net", kind="HebbianSynapse", config={"shape": [4, 3]})
        with Offline(browser, live.url) as offline:
            sign_in(offline, live.url, None)
            offline.page.wait_for_selector('article[data-instance="local/open-net"] img.filters[data-version]')
            assert card_image(offline, "local/open-net").std() > 0
            assert offline.outside == [] and offline.errors == []


def test_the_page_runs_only_its_own_script(server):
    import httpx

    answer = httpx.get(server.url + "/ui")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "<script>" not in answer.text  # no inline script: the policy would block it
    assert httpx.get(server.url + "/ui/../app.py").status_code == 404
    assert httpx.get(server.url + "/docs/assets/secret.py").status_code == 404
