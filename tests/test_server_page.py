"""The web page end to end, in a real headless Chromium driven by selenium, against a real uvicorn on loopback
(a free port, a temporary data folder, a tiny random model): type a prompt, generate, watch the preview, see the
image in the history, reload and see it again; inpaint with a brush-drawn mask; progress by polling when the event
stream is unavailable; the API-key prompt; nothing loaded from anywhere but the server.

Debian's /usr/bin/chromium and /usr/bin/chromedriver (packages chromium, chromium-driver; `make test` installs
them) are required; without them the browser tests are skipped. docs/screenshot_server_page.py drives the same
page through `estable serve` with the built-in model for the README's screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from server_util import TINY, LiveServer, SlowWorker, make_tiny_model, settings, wait_for

CHROMIUM = os.environ.get("ESTABLE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ESTABLE_CHROMEDRIVER", "/usr/bin/chromedriver")
WEB = Path(__file__).resolve().parents[1] / "src" / "estable" / "server" / "web"
PROMPT = "a red circle above a blue square"
STEPS = 6
API_KEY = "page-test-key-0123"

needs_browser = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}: apt-get install chromium chromium-driver)",
)
pytestmark = pytest.mark.usefixtures("one_thread")


class PageWorker(SlowWorker):
    delay = 0.12  # seconds per step: a generation lasts long enough for the page to show its previews


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    s = LiveServer(settings(tmp_path_factory.mktemp("serve-data"), model, preview_interval=0.01),
                   worker_class=PageWorker)
    yield s
    s.stop()


def _get(server: LiveServer, path: str, key: str | None = None) -> bytes:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = server.client.get("/" + path.lstrip("/"), headers=headers)
    r.raise_for_status()
    return r.content


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                # Any host but loopback fails to resolve: a page that reached out would break visibly.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, timeout: float = 60.0, what: str = "the condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(predicate)
    except Exception:
        status = driver.execute_script("return (document.getElementById('status') || {}).textContent")
        pytest.fail(f"timed out waiting for {what}; the page's status line says: {status!r}")


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), what="the page")


def _set(driver, element_id: str, value: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


# JS: the ids of every job in the history, its images loaded or not.
ALL_JOBS = "return [...document.querySelectorAll('#gallery > li.job')].map(li => li.dataset.jobId);"

# JS: the ids of the history's jobs whose every image has loaded.
LOADED_JOBS = """
return [...document.querySelectorAll('#gallery > li.job')]
  .filter(li => { const imgs = li.querySelectorAll('.thumbs img');
                  return imgs.length > 0 && [...imgs].every(i => i.complete && i.naturalWidth > 0); })
  .map(li => li.dataset.jobId);
"""


def _generate(driver, prompt: str, seed: int, during=None) -> str:
    """Fill the form, click Generate, (call ``during(driver)``), wait for the job's image in the history;
    returns the job id."""
    before = set(driver.execute_script(ALL_JOBS))  # loaded or still loading: older jobs are never "new"
    _set(driver, "prompt", prompt)
    _set(driver, "steps", str(STEPS))
    _set(driver, "seed", str(seed))
    driver.find_element("id", "generate").click()
    if during is not None:
        during(driver)
    new = _wait(driver, lambda d: set(d.execute_script(LOADED_JOBS)) - before, what="the new image in the history")
    (job_id,) = new
    _wait(driver, lambda d: d.find_element("id", "generate").is_enabled(), what="the Generate button")
    return job_id


def _same_origin_only(driver, origin: str) -> list[str]:
    """Every URL the page loaded (navigation and resources) that is not on the server's origin."""
    urls = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => e.name)")
    assert urls, "the browser recorded no loads at all"
    return [u for u in urls if not (u.startswith(origin) or u.startswith(("data:", "blob:")))]


# ------------------------------------------------------------------------------------------------ tests


def test_served_files_name_no_other_host():
    """The page's own files point at nothing outside the server: no URL with a scheme or a protocol-relative
    one, no @import, no web font."""
    files = sorted(WEB.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "app.css"}
    for f in files:
        text = f.read_text()
        assert not re.search(r"\b(?:https?|wss?|ftp):", text), f"{f.name} names an outside URL"
        assert not re.search(r"""(?:src|href|action)\s*=\s*["']//|url\(\s*["']?//|@import|@font-face""", text), \
            f"{f.name} loads something from elsewhere"


@needs_browser
def test_generate_shows_in_history_and_survives_reload(server, browser):
    _open(browser, server.url + "/")
    # The form came from the server: samplers listed, the model's size as the default.
    assert len(browser.find_elements("css selector", "#sampler option")) >= 5
    assert browser.find_element("id", "width").get_attribute("value") == str(TINY)
    # No LoRA, embedding or ControlNet folder on this server: their controls stay hidden.
    assert not browser.find_element("id", "extras").is_displayed()
    assert not browser.find_element("id", "control-section").is_displayed()

    def sees_progress(d):
        _wait(d, lambda d: d.find_element("id", "progress-wrap").is_displayed(), what="the progress bar")
        _wait(d, lambda d: d.execute_script(
            "const p = document.getElementById('preview'); return !p.hidden && p.complete && p.naturalWidth > 0"),
            what="a preview of the running job")
        assert browser.find_element("id", "progress-text").text.startswith("Step ")

    job_id = _generate(browser, PROMPT, seed=7, during=sees_progress)
    card = browser.find_element("id", f"job-{job_id}")
    assert card.find_element("css selector", ".job-prompt").text == PROMPT
    assert "seed 7" in card.find_element("css selector", ".job-meta").text
    # The result is shown big, with its infotext; the download link carries a PNG.
    assert browser.find_element("id", "infotext").text.startswith(PROMPT)
    href = card.find_element("css selector", "a.download").get_attribute("href")
    png = _get(server, href[len(server.url):])
    assert Image.open(io.BytesIO(png)).size == (TINY, TINY)
    job = json.loads(_get(server, f"v1/jobs/{job_id}"))
    assert job["state"] == "done" and job["params"]["seed"] == 7 and job["params"]["steps"] == STEPS
    # The page followed the job through its server-sent events (polling is only the fallback).
    assert browser.execute_script(
        f"return performance.getEntriesByType('resource').some(e => e.name.endsWith('/v1/jobs/{job_id}/events'))")
    assert _same_origin_only(browser, server.url) == []

    browser.refresh()
    _open(browser, server.url + "/")
    _wait(browser, lambda d: job_id in d.execute_script(LOADED_JOBS), what="the image after a reload")
    card = browser.find_element("id", f"job-{job_id}")
    assert card.find_element("css selector", ".job-prompt").text == PROMPT

    # "Use these settings again" puts the job's parameters back into the form.
    _set(browser, "prompt", "something else")
    _set(browser, "seed", "-1")
    card.find_element("css selector", ".use-settings").click()
    assert browser.find_element("id", "prompt").get_attribute("value") == PROMPT
    assert browser.find_element("id", "seed").get_attribute("value") == "7"
    assert browser.find_element("id", "steps").get_attribute("value") == str(STEPS)

    # The dice picks a concrete seed.
    browser.find_element("id", "seed-dice").click()
    assert int(browser.find_element("id", "seed").get_attribute("value")) >= 0

    assert _same_origin_only(browser, server.url) == []


@needs_browser
def test_inpaint_with_a_brush_drawn_mask(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    _open(browser, server.url + "/")
    # A flat grey input image; the mask is painted over its left half.
    src = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(src)
    browser.find_element("css selector", "label[for=mode-inpaint]").click()
    assert browser.find_element("id", "mode-inpaint").is_selected()
    browser.find_element("id", "init-image").send_keys(str(src))
    _wait(browser, lambda d: d.find_element("id", "mask-canvas").is_displayed(), what="the mask canvas")
    canvas = browser.find_element("id", "mask-canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    browser.execute_script("document.getElementById('brush-size').value = arguments[0]", max(8, w // 6))
    chain = ActionChains(browser).move_to_element_with_offset(canvas, -w // 2 + w // 12, -h // 2 + h // 12)
    chain.click_and_hold()
    for row in range(6):  # zig-zag strokes over the left half
        y = -h // 2 + h // 12 + row * h // 6
        chain.move_to_element_with_offset(canvas, -w // 2 + w // 12, y)
        chain.move_to_element_with_offset(canvas, -w // 12, y)
    chain.release().perform()

    # Keep a copy of what the page sends.
    browser.execute_script("""
        const orig = window.fetch; window.sentBodies = [];
        window.fetch = (url, opts) => { if (opts && opts.method === 'POST') window.sentBodies.push(opts.body);
                                        return orig(url, opts); };""")
    job_id = _generate(browser, "a green triangle", seed=3)
    job = json.loads(_get(server, f"v1/jobs/{job_id}"))
    assert job["state"] == "done" and job["mode"] == "inpaint"
    assert Image.open(io.BytesIO(_get(server, job["images"][0]["url"]))).size == (TINY, TINY)

    (sent,) = [json.loads(b) for b in browser.execute_script("return window.sentBodies")]
    assert sent["mode"] == "inpaint" and sent["prompt"] == "a green triangle" and 0 < sent["strength"] <= 1
    init = Image.open(io.BytesIO(base64.b64decode(sent["init_image"])))
    assert init.size == (256, 256) and init.convert("RGB").getpixel((200, 40)) == (128, 128, 128)
    mask = Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("L")
    assert mask.size == (256, 256)
    hist = mask.histogram()
    assert hist[0] + hist[255] == 256 * 256, "the mask is not black and white"
    white = lambda box: mask.crop(box).histogram()[255] / ((box[2] - box[0]) * (box[3] - box[1]))  # noqa: E731
    assert white((24, 24, 104, 232)) > 0.9, "the painted left half is not white"
    assert white((150, 0, 256, 256)) == 0.0, "the unpainted right part is not black"


@needs_browser
def test_polling_when_the_event_stream_is_unavailable(server, browser):
    _open(browser, server.url + "/")
    browser.execute_script("window.TextDecoderStream = undefined")  # the stream reader cannot start
    job_id = _generate(browser, "a yellow star", seed=5)
    polls = browser.execute_script(
        f"return performance.getEntriesByType('resource').filter(e => e.name.endsWith('/v1/jobs/{job_id}')).length")
    assert polls >= 1
    card = browser.find_element("id", f"job-{job_id}")
    assert card.find_element("css selector", ".job-prompt").text == "a yellow star"


@needs_browser
def test_history_pages(server, browser):
    ids = [server.client.post("/v1/jobs", json={"prompt": f"job {k}", "steps": 1, "seed": k}).json()["id"]
           for k in range(13)]
    wait_for(lambda: all(server.client.get(f"/v1/jobs/{i}").json()["state"] == "done" for i in ids), timeout=60)
    total = server.client.get("/v1/jobs?limit=1").json()["total"]
    _open(browser, server.url + "/")
    cards = lambda d: d.find_elements("css selector", "#gallery > li.job")  # noqa: E731
    assert len(cards(browser)) == 12  # one page
    assert browser.find_element("id", "gallery-count").text == f"{total} jobs"
    assert cards(browser)[0].get_attribute("id") == f"job-{ids[-1]}"  # newest first
    more = browser.find_element("id", "gallery-more")
    while more.is_displayed():
        n = len(cards(browser))
        more.click()
        _wait(browser, lambda d, n=n: len(cards(d)) > n, what="the older jobs")
    shown = [c.get_attribute("id") for c in cards(browser)]
    assert len(shown) == total and len(set(shown)) == total


@needs_browser
def test_cfg_start_is_sent_shown_and_checked(server, browser):
    _open(browser, server.url + "/")
    _set(browser, "cfg-start", "1.5")  # out of range: the page says so on the field and sends nothing
    _set(browser, "prompt", "a red square")
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: "error" in d.find_element("id", "status").get_attribute("class"), what="the error")
    assert "CFG start" in browser.find_element("id", "status").text
    assert browser.find_element("id", "cfg-start").get_attribute("aria-invalid") == "true"

    _set(browser, "cfg-start", "0.4")
    job_id = _generate(browser, "a red square", seed=3)
    job = json.loads(_get(server, f"v1/jobs/{job_id}"))
    assert job["params"]["cfg_start"] == 0.4
    assert "CFG start 0.4" in browser.find_element("id", f"job-{job_id}").find_element(
        "css selector", ".job-meta").text
    _set(browser, "cfg-start", "0")
    browser.find_element("id", f"job-{job_id}").find_element("css selector", ".use-settings").click()
    assert browser.find_element("id", "cfg-start").get_attribute("value") == "0.4"
    _set(browser, "cfg-start", "0")


@needs_browser
def test_a_rejection_by_the_server_is_shown_on_its_field(server, browser):
    _open(browser, server.url + "/")
    too_long = "x" * (server.settings.limits.max_prompt_length + 1)  # the page checks the prompt, not this one
    browser.execute_script("document.getElementById('negative-prompt').value = arguments[0]", too_long)
    _set(browser, "prompt", "a blue circle")
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: "error" in d.find_element("id", "status").get_attribute("class"), what="the error")
    assert browser.find_element("id", "status").text.startswith("negative_prompt:")
    assert browser.find_element("id", "negative-prompt").get_attribute("aria-invalid") == "true"
    assert browser.find_element("id", "generate").is_enabled()
    browser.execute_script("document.getElementById('negative-prompt').value = ''")


@needs_browser
def test_prompt_completion_checkbox(server, tmp_path, browser):
    """A model whose file names a prompt completion gets a checkbox (on by default) that goes out as the job's
    complete_prompt; the image's record holds the prompt as completed, or as written with the box cleared. The other
    tests' model names none: no checkbox, and jobs leave the field to the server."""
    _open(browser, server.url + "/")
    assert not browser.find_element("id", "complete-prompt").is_displayed()
    name = "shapes-grey-background"
    s = LiveServer(settings(tmp_path / "data", make_tiny_model(tmp_path / "c.safetensors", prompt_completion=name),
                            warmup=False), worker_class=PageWorker)
    try:
        _open(browser, s.url + "/")
        box = browser.find_element("id", "complete-prompt")
        assert box.is_displayed() and box.is_selected()
        assert name in browser.find_element("id", "complete-prompt-row").text
        records = []
        for checked in (True, False):
            if box.is_selected() != checked:
                box.click()
            job_id = _generate(browser, "a red circle", seed=4)
            job = json.loads(_get(s, f"v1/jobs/{job_id}"))
            assert job["params"]["complete_prompt"] is checked
            png = Image.open(io.BytesIO(_get(s, job["images"][0]["url"])))
            records.append(json.loads(png.text["estable"])["params"]["prompt"])
        assert records[0].startswith("a red circle on a ") and records[0].endswith("grey background")
        assert records[1] == "a red circle"
    finally:
        s.stop()


@needs_browser
def test_api_key_is_asked_once_and_sent(tmp_path, model, browser):
    s = LiveServer(settings(tmp_path / "data", model, api_key=API_KEY, warmup=False))
    try:
        assert s.client.get("/v1/config").status_code == 401
        browser.get(s.url + "/")
        dialog = _wait(browser, lambda d: d.find_element("id", "key-dialog").is_displayed()
                       and d.find_element("id", "key-dialog"), what="the API-key dialog")
        _set(browser, "api-key", "wrong-key-000000")
        browser.find_element("id", "api-key-submit").click()
        _wait(browser, lambda d: d.find_element("id", "key-error").is_displayed(), what="the wrong key refused")
        _set(browser, "api-key", API_KEY)
        browser.find_element("id", "api-key-submit").click()
        _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"),
              what="the page with the key")
        assert not dialog.is_displayed()
        assert len(browser.find_elements("css selector", "#sampler option")) >= 5
        assert browser.execute_script("return sessionStorage.getItem('estable.apiKey')") == API_KEY
        # Images come through blob: URLs fetched with the key.
        job_id = _generate(browser, PROMPT, seed=1)
        src = browser.find_element("css selector", f"#job-{job_id} .thumbs img").get_attribute("src")
        assert src.startswith("blob:")
    finally:
        browser.execute_script("sessionStorage.clear()")
        s.stop()


@needs_browser
def test_lora_embedding_and_controlnet_controls(tmp_path, model, browser):
    """With LoRA, embedding and ControlNet folders the page offers them: picking a LoRA or an embedding writes it into
    the prompt, and a ControlNet with an uploaded image goes out as the job's control unit; the image's record holds
    both. Without those folders the controls stay hidden (the other tests' server)."""
    import numpy as np
    import torch

    from estable import load_pipeline
    from estable.checkpoints.controlnet_format import save_controlnet
    from estable.embeddings import save_embedding
    from estable.models.controlnet import ControlNet
    from test_server_extras import _random_lora

    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    for sub in ("loras", "emb", "cn"):
        (tmp_path / sub).mkdir()
    _random_lora(pipe, tmp_path / "loras" / "ink.safetensors", 1)
    save_embedding(tmp_path / "emb" / "shinyred.safetensors", torch.randn(2, pipe.config.text.width))
    save_controlnet(ControlNet.from_unet(pipe.unet), tmp_path / "cn" / "edges.safetensors")
    control = np.zeros((TINY, TINY, 3), np.uint8)
    control[4:28, 14:18] = 255
    Image.fromarray(control).save(tmp_path / "control.png")
    s = LiveServer(settings(tmp_path / "data", model, lora_dir=tmp_path / "loras", embeddings_dir=tmp_path / "emb",
                            controlnet_dir=tmp_path / "cn"), worker_class=PageWorker)
    try:
        _open(browser, s.url + "/")
        assert browser.find_element("id", "extras").is_displayed()
        assert browser.find_element("id", "control-section").is_displayed()
        from selenium.webdriver.support.ui import Select

        _set(browser, "prompt", "a red circle")
        Select(browser.find_element("id", "lora-pick")).select_by_value("ink")
        Select(browser.find_element("id", "embedding-pick")).select_by_value("shinyred")
        prompt = browser.find_element("id", "prompt").get_attribute("value")
        assert prompt == "a red circle <lora:ink:1> shinyred"
        Select(browser.find_element("id", "control-model")).select_by_value("edges")
        browser.find_element("id", "generate").click()  # no control image yet: refused on the page
        _wait(browser, lambda d: "error" in d.find_element("id", "status").get_attribute("class"), what="the error")
        assert browser.find_element("id", "control-image").get_attribute("aria-invalid") == "true"
        browser.find_element("id", "control-image").send_keys(str(tmp_path / "control.png"))
        _wait(browser, lambda d: d.execute_script("return document.getElementById('control-image').files.length"))
        Select(browser.find_element("id", "control-type")).select_by_value("none")
        job_id = _generate(browser, prompt, seed=3)
        job = json.loads(_get(s, f"v1/jobs/{job_id}"))
        assert job["state"] == "done", job
        png = Image.open(io.BytesIO(_get(s, job["images"][0]["url"])))
        record = json.loads(png.text["estable"])
        assert [lora["name"] for lora in record["loras"]] == ["ink"]
        assert [e["name"] for e in record["embeddings"]] == ["shinyred"]
        assert record["control"][0]["type"] == "none" and record["control"][0]["model"]["name"] == "edges"
    finally:
        s.stop()
