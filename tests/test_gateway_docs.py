"""`/docs` works on an air-gapped site: headless chromium, every host but the gateway's
unresolvable, renders the operations from the gateway's own Swagger UI files."""

from __future__ import annotations

import re
import urllib.request

import pytest
from e2v.loadtest.gateway_process import GatewayProcess
from test_gateway import _browser


@pytest.fixture(scope="module")
def gateway(tiny_server):
    with GatewayProcess(tiny_server.config.grpc_url).start(ready=True) as process:
        yield process


def test_docs_page_references_only_this_origin(gateway):
    with urllib.request.urlopen(gateway.url + "/docs", timeout=10) as answer:
        page = answer.read().decode()
        policy = answer.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy
    assert not re.search(r"(src|href)=\"(https?:)?//", page), page
    for asset in re.findall(r"(?:src|href)=\"(/docs/assets/[^\"]+)\"", page):
        with urllib.request.urlopen(gateway.url + asset, timeout=10) as answer:
            assert answer.status == 200 and answer.read()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(gateway.url + "/docs/assets/../../etc/passwd", timeout=10)
    assert missing.value.code == 404


def test_docs_render_in_chromium_without_network(gateway, tmp_path):
    webdriver, options, driver_path = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # No route out: every name but the gateway's address fails to resolve.
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        browser.get(gateway.url + "/docs")
        WebDriverWait(browser, 60).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock"))
        )
        paths = {
            e.text.replace("\u200b", "")
            for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        }
        assert {"/predict", "/health", "/ready"} <= paths, paths
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
