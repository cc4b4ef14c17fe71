"""Safe on a network, over real HTTP: the loopback-only default, bearer and basic auth (and the public routes), CORS
closed unless asked, the body cap, decompression bombs, URLs, bounds (422 naming the field), model names that
escape the models folder, and a JSON log line per request that never holds the key."""

from __future__ import annotations

import io
import json
import logging
import struct
import time
import zlib

import pytest
from PIL import Image, PngImagePlugin

from estable.cli import main
from estable.errors import EstableError
from estable.server.settings import Limits, ServerSettings, is_loopback
from server_util import TINY, LiveServer, make_tiny_model, png_b64, settings, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.safetensors")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def access_lines():
    handler = _Lines()
    logger = logging.getLogger("estable.server.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


LIMITS = Limits(max_width=128, max_height=128, max_steps=20, max_batch_size=2, max_batch_count=3,
                max_prompt_length=100, max_body_bytes=200_000, max_image_pixels=128 * 128)


@pytest.fixture(scope="module")
def locked(model, tmp_path_factory, access_lines):
    s = LiveServer(settings(tmp_path_factory.mktemp("d"), model, api_key=KEY, api_auth=("ann", "pw-of-ann"),
                            cors_origins=("http://good.example",), limits=LIMITS, warmup=False,
                            auth_failure_limit=1000))  # this module's tests are refused often; one test throttles
    yield s
    s.stop()


@pytest.fixture(scope="module")
def open_server(model, tmp_path_factory):
    s = LiveServer(settings(tmp_path_factory.mktemp("d"), model, limits=LIMITS, warmup=False))
    yield s
    s.stop()


# ------------------------------------------------------------------------------------------------- binding


def test_non_loopback_bind_needs_a_key(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("estable: error: refusing to listen on 0.0.0.0 without an API key") and "\n" not in err
    assert main(["serve", "--host", "::", "--api-key", "short", "--data-dir", str(tmp_path)]) == 2
    assert "at least 8" in capsys.readouterr().err
    assert main(["serve", "--api-auth", "nocolon", "--data-dir", str(tmp_path)]) == 2
    assert "USER:PASS" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    ServerSettings(host="0.0.0.0", api_key=KEY).check()  # with a key it is allowed
    with pytest.raises(EstableError):
        ServerSettings(host="10.0.0.1").check()


# ---------------------------------------------------------------------------------------------------- auth


def test_auth_on(locked):
    c = locked.client
    protected = [("GET", "/sdapi/v1/samplers"), ("GET", "/sdapi/v1/options"), ("GET", "/v1/jobs"),
                 ("GET", "/v1/config"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                 ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/progress")]
    for method, path in protected:
        r = c.request(method, path)
        assert r.status_code == 401, (path, r.status_code)
        assert "Bearer" in r.headers["www-authenticate"]
        assert c.request(method, path, headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401
        assert c.request(method, path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert c.request(method, path, auth=("ann", "pw-of-ann")).status_code == 200, path
        assert c.request(method, path, auth=("ann", "wrong")).status_code == 401
        assert c.request(method, path, auth=("bob", "pw-of-ann")).status_code == 401
    for path in ("/health/live", "/health/ready", "/", "/web/index.html"):
        assert c.get(path).status_code == 200, path
    assert c.get("/v1/config", headers={"Authorization": f"Bearer {KEY}"}).json()["auth"] is True
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_auth_off(open_server):
    assert open_server.client.get("/v1/config").json()["auth"] is False
    assert open_server.client.get("/sdapi/v1/samplers").status_code == 200


def test_cors(locked, open_server):
    pre = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = locked.client.options("/sdapi/v1/txt2img", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
    r = locked.client.options("/sdapi/v1/txt2img", headers={**pre, "Origin": "http://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    r = locked.client.get("/health/live", headers={"Origin": "http://good.example"})
    assert r.headers["access-control-allow-origin"] == "http://good.example"
    # closed by default
    r = open_server.client.options("/sdapi/v1/txt2img", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = open_server.client.get("/v1/config", headers={"Origin": "http://good.example"})
    assert "access-control-allow-origin" not in r.headers


def test_access_log_lines_never_hold_the_key(locked, access_lines):
    before = len(access_lines)
    locked.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    locked.client.get("/v1/models", headers={"Authorization": "Bearer wrong-key"})
    locked.client.post("/sdapi/v1/options", json={"an_option": 1}, auth=("ann", "pw-of-ann"))
    mine = ("/v1/models", "/sdapi/v1/options")  # routes no other test of this module calls

    def lines():
        return [x for x in map(json.loads, access_lines[before:]) if x["route"] in mine]

    wait_for(lambda: len(lines()) >= 3)  # a line is written just after its response is sent
    got = lines()
    assert [(x["method"], x["route"], x["status"], x["outcome"]) for x in got] == [
        ("GET", "/v1/models", 200, "ok"), ("GET", "/v1/models", 401, "unauthorized"),
        ("POST", "/sdapi/v1/options", 200, "ok")]
    for x in got:
        assert set(x) >= {"ts", "method", "route", "client", "status", "outcome", "duration_ms", "params_hash"}
        assert x["client"] == "127.0.0.1" and x["duration_ms"] >= 0
    assert got[0]["params_hash"] is None and len(got[2]["params_hash"]) == 16
    text = "\n".join(access_lines)
    assert KEY not in text and "pw-of-ann" not in text and "wrong-key" not in text


# ------------------------------------------------------------------------------------------------ requests


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, followed by a tiny (truncated) image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def test_body_cap(open_server):
    big = {"prompt": "x", "pad": "a" * 300_000}
    r = open_server.client.post("/sdapi/v1/txt2img", json=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap is enforced while the body streams in
        yield b'{"prompt": "x", "pad": "'
        for _ in range(30):
            yield b"a" * 10_000
        yield b'"}'

    r = open_server.client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert open_server.client.get("/health/live").status_code == 200  # the server carries on


def test_images_bombs_urls_and_garbage(open_server):
    import base64

    c = open_server.client
    bomb = base64.b64encode(_bomb_png(40_000, 40_000)).decode()
    for field, body in (("init_images", {"init_images": [bomb]}),
                        ("mask", {"init_images": [png_b64(Image.new("RGB", (TINY, TINY)))], "mask": bomb})):
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, **body})
        assert r.status_code == 400 and field in r.json()["detail"] and "pixels" in r.json()["detail"], r.text
    too_big = png_b64(Image.new("RGB", (200, 200)))  # 40,000 pixels > 128²
    assert c.post("/sdapi/v1/img2img", json={"init_images": [too_big]}).status_code == 400
    r = c.post("/sdapi/v1/img2img", json={"init_images": ["https://example.org/cat.png"]})
    assert r.status_code == 400 and "never fetched" in r.json()["detail"]
    r = c.post("/v1/jobs", json={"mode": "img2img", "init_image": "file:///etc/passwd"})
    assert r.status_code == 400 and "never fetched" in r.json()["detail"]
    r = c.post("/sdapi/v1/img2img", json={"init_images": [base64.b64encode(b"not an image").decode()]})
    assert r.status_code == 400 and "init_images" in r.json()["detail"]
    r = c.post("/sdapi/v1/png-info", json={"image": bomb})
    assert r.status_code == 400


def test_a_phone_jpeg_with_more_frames_is_read_and_a_gif_is_not():
    import base64

    from estable.server.inputs import BadRequest, decode_image

    def b64(image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return base64.b64encode(buf.getvalue()).decode()

    red = Image.new("RGB", (16, 8), (255, 0, 0))
    mpo = b64(red, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 8))])  # as phone cameras write JPEGs
    im = decode_image(mpo, "init_images", Limits())
    assert im.size == (16, 8) and im.getpixel((3, 3))[0] > 240  # the first frame
    with pytest.raises(BadRequest, match="init_images is a GIF image; send PNG, JPEG or WebP"):
        decode_image(b64(red, "GIF"), "init_images", Limits())


def test_png_info_text_bombs_are_refused_and_long_lines_read_quickly(open_server):
    """A PNG of a few hundred bytes may hold megabytes of compressed text; a parameters line of letters without
    punctuation took the infotext parser time quadratic in its length, holding the GIL."""
    import base64

    def png_info(**texts):
        info = PngImagePlugin.PngInfo()
        for key, text in texts.items():
            info.add_text(key, text, zip=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
        assert len(buf.getvalue()) < 10_000
        return open_server.client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})

    start = time.perf_counter()
    r = png_info(parameters="a" * 30_000)  # 4 s of parsing once, every other request waiting
    assert r.status_code == 200 and time.perf_counter() - start < 2, r.text[:300]
    r = png_info(one="b" * 1_000_000, two="c" * 1_000_000)
    assert r.status_code == 400 and "2000006 characters of text" in r.json()["detail"], r.text[:300]
    prompt = ", ".join(f"word{k} in a long prompt" for k in range(150))  # 3,500 characters
    r = png_info(parameters=f"{prompt}\nNegative prompt: {prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                            f'Seed: 1, Size: 512x512, Hires prompt: "{prompt}", Version: v1.10.1')
    assert r.status_code == 200 and r.json()["parameters"]["Hires prompt"] == prompt, r.text[:300]


@pytest.mark.parametrize("route, body, field", [
    ("/sdapi/v1/txt2img", {"width": 1024}, "width"),
    ("/sdapi/v1/txt2img", {"height": 4}, "height"),
    ("/sdapi/v1/txt2img", {"width": 36}, "width"),  # not a multiple of 8
    ("/sdapi/v1/txt2img", {"steps": 500}, "steps"),
    ("/sdapi/v1/txt2img", {"steps": "many"}, "steps"),
    ("/sdapi/v1/txt2img", {"batch_size": 9}, "batch_size"),
    ("/sdapi/v1/txt2img", {"n_iter": 50}, "n_iter"),
    ("/sdapi/v1/txt2img", {"prompt": "p" * 101}, "prompt"),
    ("/sdapi/v1/txt2img", {"negative_prompt": "n" * 101}, "negative_prompt"),
    ("/sdapi/v1/txt2img", {"cfg_scale": 1000}, "cfg"),
    ("/sdapi/v1/txt2img", {"seed": -5}, "seed"),
    ("/v1/jobs", {"width": 4096}, "width"),
    ("/v1/jobs", {"batch_size": 3}, "batch_size"),
    ("/v1/jobs", {"steps": 0}, "steps"),
    ("/v1/jobs", {"cfg_start": 1.5}, "cfg_start"),
    ("/v1/jobs", {"cfg_start": "early"}, "cfg_start"),
    ("/v1/jobs", {"mode": "img2img"}, "init_image"),
    ("/v1/jobs", {"mode": "upscale"}, "mode"),
    ("/v1/jobs", {"sampler": "no such sampler"}, "sampler"),
])
def test_bounds_are_422_naming_the_field(open_server, route, body, field):
    r = open_server.client.post(route, json={"prompt": "x", **body})
    assert r.status_code == 422, (body, r.text)
    assert isinstance(r.json()["detail"], str) and field in r.json()["detail"], r.json()


def test_malformed_json_is_a_422_on_the_body(open_server):
    r = open_server.client.post("/v1/jobs", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON: "), r.text
    assert "at character 16" in r.json()["detail"]  # not "15: JSON decode error", a field named 15


def test_text_that_is_not_utf8_and_deep_nesting_are_422_not_a_500_later(open_server):
    """JSON's "\\ud800" is a lone surrogate in Python: pydantic took it, and the response that echoes it (A1111's
    parameters, the job, GET /sdapi/v1/options) could not be written; so a 500 after the job was queued, and one
    on every later GET /v1/jobs or GET /sdapi/v1/options. Nesting past what a response can echo likewise."""
    c = open_server.client
    before = c.get("/v1/jobs").json()["total"]

    def post(route, raw):
        return c.post(route, content=raw.encode(), headers={"Content-Type": "application/json"})

    deep = "[" * 100 + "]" * 100
    for route, raw, field in (
            ("/v1/jobs", '{"prompt": "a \\ud800", "steps": 1}', "prompt"),
            ("/sdapi/v1/txt2img", '{"prompt": "x", "negative_prompt": "\\udfff", "steps": 1}', "negative_prompt"),
            ("/sdapi/v1/txt2img", '{"prompt": "x", "styles": ["\\ud800"], "steps": 1}', "styles.0"),
            ("/sdapi/v1/txt2img", f'{{"prompt": "x", "script_args": {deep}, "steps": 1}}', "script_args: "),
            ("/sdapi/v1/options", '{"an_option": "\\ud800"}', "an_option"),
            ("/sdapi/v1/options", '{"\\ud800": 1}', "body"),
            ("/sdapi/v1/options", f'{{"deep": {deep}}}', "deep: ")):
        r = post(route, raw)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}"), (route, raw[:60], r.text[:200])
        assert "lone surrogate U+D" in r.json()["detail"] or "nested more than 64" in r.json()["detail"]
    assert c.get("/v1/jobs").json()["total"] == before  # nothing was queued
    assert c.get("/sdapi/v1/options").status_code == 200
    r = post("/sdapi/v1/options", '{"an_option": "caf\\u00e9 \\ud83d\\udc31", "nested": [[1]]}')  # a whole pair
    assert r.status_code == 200 and c.get("/sdapi/v1/options").json()["an_option"] == "café \U0001f431"


def test_input_image_size_is_bounded_when_it_sets_the_size(open_server):
    wide = png_b64(Image.new("RGB", (160, 16)))  # 2,560 pixels (under the cap) but wider than 128
    r = open_server.client.post("/sdapi/v1/img2img", json={"init_images": [wide], "steps": 2})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images:")
    r = open_server.client.post("/v1/jobs", json={"mode": "img2img", "init_image": wide})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_image:")
    r = open_server.client.post("/sdapi/v1/img2img", json={"init_images": [wide], "steps": 2, "width": TINY,
                                                           "height": TINY})
    assert r.status_code == 200  # resized to the size asked for


def test_strength_bound(open_server):
    img = png_b64(Image.new("RGB", (TINY, TINY)))
    r = open_server.client.post("/v1/jobs", json={"mode": "img2img", "init_image": img, "strength": 2.0})
    assert r.status_code == 422 and "strength" in r.json()["detail"]
    r = open_server.client.post("/sdapi/v1/img2img", json={"init_images": [img], "denoising_strength": 0})
    assert r.status_code == 422 and "strength" in r.json()["detail"]


def test_model_names_cannot_escape(open_server):
    for name in ("../tiny.safetensors", "/etc/passwd", "..", "sub/dir", "nope"):
        r = open_server.client.post("/v1/jobs", json={"prompt": "x", "model": name})
        assert r.status_code == 400, name
        assert "models folder" in r.json()["detail"] or "unknown model" in r.json()["detail"]


def test_public_prefixes_do_not_open_other_routes(locked):
    """Paths that start like a public route but lead elsewhere (dot segments, encoded slashes) are not let through."""
    import http.client

    for raw in ("/web/../v1/jobs", "/health/../v1/jobs", "/web/%2e%2e/v1/jobs", "/web%2F..%2Fv1%2Fjobs",
                "/health/live/../../v1/config"):
        conn = http.client.HTTPConnection("127.0.0.1", locked.port, timeout=10)
        conn.request("GET", raw)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        conn.close()
        assert resp.status in (401, 404), (raw, resp.status, body[:200])
        assert '"jobs"' not in body and '"limits"' not in body, raw


def test_serve_flags_become_settings(tmp_path):
    from estable.cli import build_parser
    from estable.cli_serve import settings_from_args

    key = tmp_path / "key"
    key.write_text("  a-long-enough-key  \nignored\n")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--api-key-file", str(key), "--api-auth",
                                      "u:pass:word", "--cors-origin", "https://a.example", "--max-body-mb", "1",
                                      "--max-size", "512", "--max-steps", "30", "--queue", "3", "--timeout", "9",
                                      "--max-connections-per-client", "0", "--max-megapixels", "0.5",
                                      "--keep-jobs", "5", "--forwarded-allow-ips", "10.0.0.0/8, ::1"])
    s = settings_from_args(args)
    s.check()
    assert s.api_key == "a-long-enough-key" and s.api_auth == ("u", "pass:word") and s.cors_origins == ("https://a.example",)
    assert s.limits.max_body_bytes == 2**20 and s.limits.max_width == s.limits.max_height == 512
    assert s.limits.max_steps == 30 and s.queue_size == 3 and s.job_timeout == 9 and s.max_client_connections == 0
    assert s.limits.max_job_pixels == 2**19 and s.keep_jobs == 5 and s.forwarded_allow_ips == "10.0.0.0/8, ::1"
    defaults = settings_from_args(build_parser().parse_args(["serve"]))
    assert (defaults.host, defaults.port, defaults.model, defaults.api_key) == ("127.0.0.1", 7860, "default", None)
    assert defaults.limits.max_body_bytes == 32 * 2**20 and defaults.forwarded_allow_ips is None
    key.write_text("\n")
    with pytest.raises(EstableError, match="empty"):
        settings_from_args(build_parser().parse_args(["serve", "--api-key-file", str(key)]))
    with pytest.raises(EstableError, match="cannot read"):
        settings_from_args(build_parser().parse_args(["serve", "--api-key-file", str(tmp_path / "nope")]))
    with pytest.raises(EstableError, match="cors-origin"):
        settings_from_args(build_parser().parse_args(["serve", "--cors-origin", "example.org"])).check()
    with pytest.raises(EstableError, match="needs an API key"):
        settings_from_args(build_parser().parse_args(["serve", "--cors-origin", "*"])).check()
    with pytest.raises(EstableError, match="password must be at least 8"):
        settings_from_args(build_parser().parse_args(["serve", "--api-auth", "a:b"])).check()
    for size in ("7", "100000"):
        with pytest.raises(EstableError, match=f"--max-size must be from 8 to 2048 pixels, not {size}"):
            settings_from_args(build_parser().parse_args(["serve", "--max-size", size]))
    with pytest.raises(EstableError, match="connections-per-client"):
        settings_from_args(build_parser().parse_args(["serve", "--max-connections-per-client", "-1"])).check()
    for ips in ("127.0.0.l", "", "10.0.0.1,"):
        with pytest.raises(EstableError, match="forwarded-allow-ips"):
            settings_from_args(build_parser().parse_args(["serve", "--forwarded-allow-ips", ips])).check()
    settings_from_args(build_parser().parse_args(["serve", "--forwarded-allow-ips", "*"])).check()


# ------------------------------------------------------------------------------------------------- connections


def _idle(port: int, source: str = "127.0.0.1"):
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.settimeout(0.05)
    return sock


def _closed_by_server(sock, within: float) -> bool:
    """True when the server closes ``sock`` (EOF) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_idle_connections_cannot_lock_others_out(model, tmp_path, monkeypatch):
    """A client holding connections open without requests gets its own past the cap closed, and each one it keeps
    is closed after the head timeout; another address is served all along; a request that runs long is not cut."""
    import httpx

    from estable.server import middleware, run

    monkeypatch.setattr(run.GuardedProtocol, "head_timeout", 2.0)
    monkeypatch.setattr(middleware, "BODY_TIMEOUT", 1.0)
    from server_util import SlowWorker

    s = LiveServer(settings(tmp_path, model, max_client_connections=4), worker_class=SlowWorker)
    try:
        s.client.close()  # its keep-alive connection would count against 127.0.0.1's four
        time.sleep(0.3)
        socks = [_idle(s.port) for _ in range(6)]
        closed_at_once = [_closed_by_server(sock, 0.15) for sock in socks]  # 0.9 s in all: before the timeout
        assert sum(closed_at_once) == 2, closed_at_once  # the fifth and sixth
        other = httpx.Client(base_url=s.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
        assert other.get("/health/live").status_code == 200  # another address is not locked out
        kept = [sock for sock, gone in zip(socks, closed_at_once) if not gone]
        assert all(_closed_by_server(sock, 3.0) for sock in kept)  # the head timeout
        half = _idle(s.port)
        half.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head that never ends
        assert _closed_by_server(half, 3.0)
        slow_body = _idle(s.port)
        slow_body.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\":")  # a body that never ends
        slow_body.settimeout(5)
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408")
        for sock in (*socks, half, slow_body):
            sock.close()
        SlowWorker.delay = 0.3  # 15 steps: a request running 4.5 s, twice the head timeout
        r = other.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 15})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        other.close()
    finally:
        SlowWorker.delay = 0.05
        s.stop()


def test_host_origin_checks_and_security_headers(open_server, locked):
    c = open_server.client
    assert c.get("/v1/config", headers={"Host": "rebind.attacker.example"}).status_code == 403
    assert c.get("/v1/config", headers={"Host": f"localhost:{open_server.port}"}).status_code == 200
    assert c.get("/v1/config", headers={"Host": f"[::1]:{open_server.port}"}).status_code == 200
    raw = _idle(open_server.port)
    raw.settimeout(5)
    raw.sendall(b"GET /v1/config HTTP/1.0\r\n\r\n")  # HTTP/1.0 without Host: not a browser
    assert raw.recv(100).startswith(b"HTTP/1.1 200")
    raw.close()
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    r = c.post("/sdapi/v1/interrupt", headers=evil)
    assert r.status_code == 403 and "another origin" in r.json()["detail"]
    assert c.post("/sdapi/v1/interrupt", headers={"Origin": open_server.url}).status_code == 200
    assert c.post("/sdapi/v1/interrupt").status_code == 200  # no Origin: not a web page (curl, scripts)
    assert c.get("/v1/config", headers={"Origin": "https://evil.example"}).status_code == 200  # reading: CORS's job
    auth = {"Authorization": f"Bearer {KEY}"}
    assert locked.client.post("/sdapi/v1/interrupt", headers={**auth, "Origin": "http://good.example"}).status_code \
        == 200  # a --cors-origin may
    assert locked.client.post("/sdapi/v1/interrupt", headers={**auth, "Origin": "http://evil.example"}).status_code \
        == 403
    # a server with a key answers to any Host (it may be reached by any name)
    assert locked.client.get("/v1/config", headers={**auth, "Host": "gpu-box.lan"}).status_code == 200
    page = c.get("/")
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    for r in (c.get("/v1/config"), locked.client.get("/v1/config"), c.get("/web/app.js")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in r.headers or r.headers["content-type"].startswith("text/html")


def test_refused_attempts_are_throttled_per_address(model, tmp_path):
    import httpx

    s = LiveServer(settings(tmp_path, model, api_key=KEY, auth_failure_limit=3, warmup=False))
    try:
        for _ in range(3):
            assert s.client.get("/v1/config", headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        r = s.client.get("/v1/config", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert s.client.get("/health/live").status_code == 200  # public routes stay open
        other = httpx.Client(base_url=s.url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        assert other.get("/v1/config", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        other.close()
    finally:
        s.stop()


def test_a_client_cannot_name_another_address_to_dodge_the_throttle(model, tmp_path):
    """X-Forwarded-For is trusted only from the proxies named by forwarded_allow_ips (default none): a local client
    rotating the header is still one address to the throttle; behind a named proxy the header's address counts."""
    s = LiveServer(settings(tmp_path / "a", model, api_key=KEY, auth_failure_limit=3, warmup=False))
    try:
        for k in range(3):
            r = s.client.get("/v1/config", headers={"Authorization": "Bearer wrong-key",
                                                    "X-Forwarded-For": f"10.0.0.{k + 1}"})
            assert r.status_code == 401
        r = s.client.get("/v1/config", headers={"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "10.0.0.9"})
        assert r.status_code == 429
    finally:
        s.stop()
    s = LiveServer(settings(tmp_path / "b", model, api_key=KEY, auth_failure_limit=3, warmup=False,
                            forwarded_allow_ips="127.0.0.1"))
    try:
        proxied = {"X-Forwarded-For": "10.0.0.1"}
        for _ in range(3):
            r = s.client.get("/v1/config", headers={"Authorization": "Bearer wrong-key", **proxied})
            assert r.status_code == 401
        assert s.client.get("/v1/config", headers={"Authorization": f"Bearer {KEY}", **proxied}).status_code == 429
        r = s.client.get("/v1/config", headers={"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "10.0.0.2"})
        assert r.status_code == 200
    finally:
        s.stop()


def test_head_needs_the_key_as_get_does(locked, access_lines):
    assert locked.client.head("/v1/config").status_code == 401
    before = len(access_lines)
    r = locked.client.head("/v1/config", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.content == b"" and r.headers["x-content-type-options"] == "nosniff"
    # log lines are written after their responses: the 401's may come after `before`, so find this request's
    line = wait_for(lambda: next((x for x in map(json.loads, access_lines[before:])
                                  if (x["method"], x["status"]) == ("HEAD", 200)), None))
    assert line["route"] == "/v1/config"
    assert locked.client.head("/health/live").status_code == 200


def test_odd_methods_share_one_metrics_label(locked):
    auth = {"Authorization": f"Bearer {KEY}"}
    for k in range(5):
        locked.client.request(f"M{k:04d}X", "/v1/jobs", headers=auth)
    text = locked.client.get("/metrics", headers=auth).text
    assert "M0001X" not in text and 'method="other"' in text


# ------------------------------------------------------------------------------------------------- job size


def test_check_job_size_counts_what_is_drawn():
    from estable.params import GenerationParams
    from estable.server.inputs import FieldError, check_job_size

    lim = Limits(max_width=512, max_height=512, max_job_pixels=512 * 512 * 2)
    check_job_size(GenerationParams(width=512, height=512, batch_size=2), None, lim)
    with pytest.raises(FieldError, match="batch_size: 3 image.*786432 pixels"):
        check_job_size(GenerationParams(width=512, height=512, batch_size=3), None, lim)
    with pytest.raises(FieldError, match="hr_scale: width 256 × 4 is 1024"):
        check_job_size(GenerationParams(width=256, height=256, hires_scale=4), None, lim, names={"hires_scale":
                                                                                                "hr_scale"})
    check_job_size(GenerationParams(), None, lim)  # the model's size not known yet: not checked here
    with pytest.raises(FieldError, match="width: is not given, and the model draws 768; at most 512"):
        check_job_size(GenerationParams(), (768, 768), lim)
    with pytest.raises(FieldError, match="hires_scale: width 384 × 2 is 768"):
        check_job_size(GenerationParams(hires_scale=2), (384, 384), lim)
    image = Image.new("RGB", (600, 400))  # img2img: the image's size, and no hires fix
    with pytest.raises(FieldError, match="width: is not given, and the model draws 600"):
        check_job_size(GenerationParams(hires_scale=2), None, lim, image)
    check_job_size(GenerationParams(width=256, height=256, hires_scale=2), None, lim, image)


def test_steps_and_size_limits_cannot_be_walked_around(model, tmp_path):
    lim = Limits(max_width=24, max_height=24, max_steps=5, max_job_pixels=16 * 16 * 2)
    s = LiveServer(settings(tmp_path, model, limits=lim, warmup=False))  # the tiny model draws 32x32
    try:
        c = s.client
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        assert r.status_code == 422 and r.json()["detail"].startswith("width: is not given, and the model draws 32")
        r = c.post("/v1/jobs", json={"prompt": "x", "steps": 2})
        assert r.status_code == 422 and "the model draws 32" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 16, "height": 16,
                                              "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1000})
        assert r.status_code == 422 and r.json()["detail"].startswith("hr_second_pass_steps: must be between 0 and 5")
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 16, "height": 16,
                                              "enable_hr": True, "hr_scale": 2})
        assert r.status_code == 422 and r.json()["detail"].startswith("hr_scale: width 16 × 2 is 32; at most 24")
        r = c.post("/v1/jobs", json={"prompt": "x", "steps": 2, "width": 16, "height": 16, "batch_size": 3})
        assert r.status_code == 422 and r.json()["detail"].startswith("batch_size: 3 image(s) of 16x16")
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 16, "height": 16,
                                              "batch_size": 2})
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        assert c.get("/v1/config").json()["limits"]["max_job_pixels"] == 512
        from estable.params import GenerationParams
        from estable.server.worker import Job

        job = s.state.worker.submit(Job(mode="txt2img", params=GenerationParams(prompt="x", steps=2, seed=1)))
        assert job.done.wait(30) and job.state == "failed"  # admitted past the checks: the worker checks again
        assert job.error.startswith("width: is not given, and the model draws 32") and not job.images
    finally:
        s.stop()


def test_what_the_library_would_refuse_is_a_422_before_any_job(open_server):
    c = open_server.client
    before = c.get("/v1/jobs").json()["total"]
    layers = open_server.state.worker.pipe.config.text.layers
    base = {"prompt": "x", "steps": 2}
    image = png_b64(Image.new("RGB", (TINY, TINY), "red"))
    for route, body, field in (
            ("/sdapi/v1/txt2img", {**base, "prompt": f"(red circle:1{'0' * 39})"}, "prompt"),  # 1e39: inf
            ("/v1/jobs", {**base, "negative_prompt": "((x:100000))"}, "negative_prompt"),
            ("/sdapi/v1/txt2img", {**base, "override_settings": {"CLIP_stop_at_last_layers": layers + 1}},
             "override_settings.CLIP_stop_at_last_layers"),
            ("/v1/jobs", {**base, "clip_skip": layers + 1}, "clip_skip"),
            ("/sdapi/v1/img2img", {**base, "init_images": [image], "denoising_strength": 1e-9}, "denoising_strength"),
            ("/v1/jobs", {**base, "mode": "img2img", "init_image": image, "strength": 0.1}, "strength"),
            ("/sdapi/v1/txt2img", {**base, "width": 16, "height": 16, "enable_hr": True, "hr_scale": 2,
                                   "denoising_strength": 0.01}, "denoising_strength")):
        r = c.post(route, json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: "), (route, body, r.text)
    for route, body, field in (("/sdapi/v1/txt2img", {**base, "steps": True}, "steps"),
                               ("/v1/jobs", {**base, "cfg_scale": False}, "cfg_scale"),
                               ("/controlnet/detect", {"controlnet_processor_res": True}, "controlnet_processor_res")):
        r = c.post(route, json=body)  # pydantic alone would read true as 1
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}: must be a number"), (route, r.text)
    assert c.get("/v1/jobs").json()["total"] == before  # nothing was queued
    r = c.get("/v1/jobs", params={"offset": 10**20})
    assert r.status_code == 422 and r.json()["detail"].startswith("offset")
    r = c.post("/v1/jobs", json={"mode": "img2img", "init_image": "aGVsbG8="})
    assert r.status_code == 400 and "0x" not in r.json()["detail"] and "BytesIO" not in r.json()["detail"]


def test_keep_jobs_prunes_the_oldest_finished_jobs_and_their_files(model, tmp_path):
    s = LiveServer(settings(tmp_path, model, keep_jobs=2, warmup=False))
    try:
        for seed in range(4):
            assert s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": seed}).status_code == 200
        jobs = s.client.get("/v1/jobs").json()
        assert jobs["total"] == 2 and [j["params"]["seed"] for j in jobs["jobs"]] == [3, 2]
        assert len(list((tmp_path / "images").glob("*.png"))) == 2  # the pruned jobs' images are gone too
    finally:
        s.stop()


def test_keep_jobs_spares_a_job_whose_request_has_not_read_its_images(model, tmp_path):
    """A synchronous A1111 call reads its job's images after the job finished; a newer job's pruning must not take
    them first (several callers at once, more than --keep-jobs)."""
    s = LiveServer(settings(tmp_path, model, keep_jobs=1, warmup=False))
    try:
        def seeds():
            return [j["params"]["seed"] for j in s.client.get("/v1/jobs").json()["jobs"]]

        assert s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": 0}).status_code == 200
        first = s.client.get("/v1/jobs").json()["jobs"][0]["id"]
        s.state.worker.hold(first)  # as _generate holds it while its request waits and reads
        r = s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": 1})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert seeds() == [1, 0] and len(list((tmp_path / "images").glob("*.png"))) == 2  # spared while held
        s.state.worker.release(first)
        assert seeds() == [1] and len(list((tmp_path / "images").glob("*.png"))) == 1  # pruned once released
    finally:
        s.stop()
