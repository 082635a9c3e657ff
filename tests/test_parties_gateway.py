"""The gateway's `/predict?channels=split` over real HTTP, and the page's lane per party.

A real uvicorn-served gateway in front of the real tiny Triton server; the stereo calls
of tests/test_parties.py (espeak-ng voices). Each answer equals `e2v classify --parties
... --json` on the same file; bad values are 400, a 3-channel file with two names a 422
row. The page, in headless chromium, draws one timeline lane per party. The synthetic
model's labels are meaningless.
"""

from __future__ import annotations

import pytest
from e2v.loadtest.gateway_process import GatewayProcess
from test_gateway import _browser, assert_same, comparable, upload
from test_parties import calls, classify  # noqa: F401 - `calls` is a fixture

pytest.importorskip("fastapi", reason="the gateway extra is not installed")


@pytest.fixture(scope="module")
def gateway(tiny_server, tmp_path_factory):
    spool = tmp_path_factory.mktemp("parties-spool")
    process = GatewayProcess(tiny_server.config.grpc_url, "--spool-dir", str(spool))
    with process.start(ready=True):
        yield process


def test_split_over_http_equals_classify(gateway, tiny_server, calls):  # noqa: F811
    theirs, _ = classify(
        tiny_server, [calls["mulaw"], calls["flac"]], "--parties", "customer,agent"
    )
    label = next(iter(theirs["call-mulaw.wav"]["scores"]))
    for key, query in (
        ("mulaw", "?channels=split"),
        ("flac", "?parties=customer,agent&embeddings=true"),
    ):
        name = calls[key].name
        status, _, ours = upload(gateway, calls[key], query)
        assert status == 200, ours
        assert ours["filename"] == name and [p["party"] for p in ours["parties"]] == [
            "customer",
            "agent",
        ]
        if "embeddings" in query:
            for party in ours["parties"]:
                assert all(len(s.pop("embedding")) > 0 for s in party["segments"])
        assert_same(comparable(ours), comparable(theirs[name]), name)
    # per-party alerts, and a mix is still a mix
    status, _, ours = upload(gateway, calls["mulaw"], f"?channels=split&alert=agent:{label}=0")
    assert status == 200 and [a["party"] for a in ours["alerts"]] == ["agent"]
    assert ours["parties"][0]["alerts"] == [] and ours["parties"][1]["alerts"]
    status, _, mixed = upload(gateway, calls["mulaw"])
    assert status == 200 and "parties" not in mixed and mixed["segments"]


def test_split_refusals(gateway, calls):  # noqa: F811
    status, _, row = upload(gateway, calls["three"], "?channels=split")
    assert status == 422 and row["error_kind"] == "channels", row
    assert "3 channels but 2 party name(s)" in row["error"]
    status, _, row = upload(gateway, calls["three"], "?parties=a,b,c")
    assert status == 200 and len(row["parties"]) == 3
    for query, words in (
        ("?channels=stereo", "channels"),
        ("?parties=a,a", "must differ"),
        ("?parties=a%20b", "party names are"),
        ("?channels=split&alert=boss:angry=0.5", "party 'boss' is not one of"),
        ("?alert=customer:angry=0.5", "needs channels=split"),
    ):
        status, _, row = upload(gateway, calls["mono"], query)
        assert status == 400, (query, row)
        assert words in row["error"], (query, row)


def test_page_draws_one_lane_per_party(gateway, calls, tmp_path):  # noqa: F811
    webdriver, options, driver_path = _browser()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(gateway.url + "/")
        browser.find_element(By.CSS_SELECTOR, "#options summary").click()
        Select(browser.find_element(By.ID, "channels")).select_by_value("split")
        browser.find_element(By.ID, "file").send_keys(str(calls["mulaw"]))
        WebDriverWait(browser, 120).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".lane .segment"))
        )
        lanes = browser.find_elements(By.CSS_SELECTOR, ".lane")
        assert [lane.get_attribute("data-party") for lane in lanes] == ["customer", "agent"]
        for lane in lanes:
            blocks = lane.find_elements(By.CSS_SELECTOR, ".segment")
            assert blocks and all(b.get_attribute("title").startswith(
                lane.get_attribute("data-party") + ", ") for b in blocks)  # fmt: skip
        names = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".lane-name")]
        assert names[0].startswith("customer") and names[1].startswith("agent")
        ActionChains(browser).move_to_element(
            lanes[1].find_element(By.CSS_SELECTOR, ".segment")
        ).perform()
        assert browser.find_element(By.CSS_SELECTOR, ".segment-detail").text.startswith("agent, ")
        figures = browser.find_element(By.CSS_SELECTOR, ".conversation").text
        assert "overlap" in figures and "longest silence" in figures
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        # mixed again: one timeline, no lanes
        Select(browser.find_element(By.ID, "channels")).select_by_value("mix")
        browser.find_element(By.ID, "file").send_keys(str(calls["mono"]))
        WebDriverWait(browser, 120).until(
            lambda b: (
                not b.find_elements(By.CSS_SELECTOR, ".lane")
                and b.find_elements(By.CSS_SELECTOR, ".timeline .segment")
            )
        )
    finally:
        browser.quit()
