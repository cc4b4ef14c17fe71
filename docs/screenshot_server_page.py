"""Draw docs/server_page.png: the web page of `estable serve` after a few generations with the built-in model.

    PYTHONPATH=src python docs/screenshot_server_page.py [--out docs/server_page.png]

Starts `estable serve` on a free loopback port with a fresh data folder, drives Debian's headless Chromium
(/usr/bin/chromium, /usr/bin/chromedriver) through the page like a user (type a prompt, set the seed, click
Generate, wait), and saves a screenshot of the whole page. The last prompt is the one shown large.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPTS = [  # (prompt, seed); the history lists them newest first
    ("two green triangles on a yellow background", 10),
    ("a purple star left of an orange circle", 11),
    ("three blue squares", 12),
    ("a small white hexagon below a large red square", 13),
    ("a red circle above a blue square", 1),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "server_page.png")
    ap.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels")
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "estable.cli", "serve", "--port", str(port),
                                   "--data-dir", str(Path(tmp) / "data"), "--device", "cpu"])
        try:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(url + "health/ready", timeout=2):
                    break
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("estable serve did not become ready")
                time.sleep(0.25)

            opts = webdriver.ChromeOptions()
            opts.binary_location = os.environ.get("ESTABLE_CHROMIUM", "/usr/bin/chromium")
            for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      "--hide-scrollbars", f"--window-size={args.width},1000", f"--user-data-dir={tmp}/profile"):
                opts.add_argument(a)
            driver = webdriver.Chrome(
                service=Service(os.environ.get("ESTABLE_CHROMEDRIVER", "/usr/bin/chromedriver")), options=opts)
            wait = WebDriverWait(driver, 600, poll_frequency=0.2)
            try:
                driver.get(url)
                wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
                for k, (prompt, seed) in enumerate(PROMPTS, 1):
                    for field, value in (("prompt", prompt), ("seed", str(seed))):
                        el = driver.find_element("id", field)
                        el.clear()
                        el.send_keys(value)
                    driver.find_element("id", "generate").click()
                    try:
                        wait.until(lambda d, k=k: d.find_element("id", "generate").is_enabled() and d.execute_script(
                            "return document.querySelectorAll('#gallery li.job[data-state=done]').length") == k)
                    except Exception:
                        sys.exit(f"no image for {prompt!r}; the page says: {driver.find_element('id', 'status').text}")
                wait.until(lambda d: d.execute_script(
                    "return [...document.images].every(i => i.hidden || (i.complete && i.naturalWidth > 0))"))
                driver.execute_script("document.activeElement.blur()")
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(args.width, height + 140)  # the window's frame is counted in its size
                time.sleep(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
