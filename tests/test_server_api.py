"""Estable's own API (/v1) per SERVER_CONTRACT.md over real HTTP: jobs, history paging, server-sent events,
cancellation and deletion, images, models, samplers, config; health, metrics, the offline docs and the page."""

from __future__ import annotations

import json
import re
import time

import pytest
from PIL import Image

from estable.server.worker import Worker
from server_util import TINY, LiveServer, SlowWorker, make_tiny_model, png_b64, settings, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

JOB_KEYS = {"id", "state", "mode", "model", "params", "progress", "step", "steps", "preview", "images", "error",
            "created", "finished"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.safetensors")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = LiveServer(settings(tmp_path_factory.mktemp("d"), model, preview_interval=0.01), worker_class=SlowWorker)
    yield s
    s.stop()


def finished(server, job_id):
    return wait_for(lambda: (j := server.client.get(f"/v1/jobs/{job_id}").json())["state"] in
                    ("done", "failed", "cancelled", "interrupted") and j)


def test_job_lifecycle_and_image(server):
    r = server.client.post("/v1/jobs", json={"prompt": "a blue square", "steps": 2, "seed": -1, "width": TINY,
                                             "height": TINY, "batch_size": 2, "sampler": "Euler a", "extra": 1})
    assert r.status_code == 202, r.text
    job = r.json()
    assert set(job) == JOB_KEYS and job["state"] in ("queued", "running")
    assert re.fullmatch(r"[0-9a-f]{32}", job["id"]) and job["steps"] == 2
    seed = job["params"]["seed"]
    assert seed >= 0  # -1 is resolved when the job is made, so the job shows the seed it uses
    done = finished(server, job["id"])
    assert done["state"] == "done" and done["progress"] == 1.0 and done["step"] == 2 and done["error"] is None
    assert done["params"]["sampler"] == "euler_a" and done["params"]["width"] == TINY
    assert done["params"]["cfg_scale"] == 7.0  # the tiny model records no guidance scale: the library's default
    assert done["finished"] >= done["created"] and done["model"] == "tiny"
    assert [im["seed"] for im in done["images"]] == [seed, seed + 1]
    for im in done["images"]:
        assert im["url"] == f"/v1/images/{im['id']}.png"
        r = server.client.get(im["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        png = Image.open(__import__("io").BytesIO(r.content))
        assert png.text["parameters"] == im["infotext"] and f"Seed: {im['seed']}" in im["infotext"]
        assert json.loads(png.text["estable"])["params"]["seed"] == im["seed"]
    assert server.client.get("/v1/images/" + "0" * 32 + ".png").status_code == 404
    assert server.client.get("/v1/images/..%2F..%2Fjobs.sqlite3.png").status_code == 404
    assert server.client.get("/v1/jobs/nope").status_code == 404


def test_guidance_interval_job(server):
    body = {"prompt": "a blue square", "steps": 2, "seed": 3, "width": TINY, "height": TINY, "cfg_scale": 5}
    plain = finished(server, server.client.post("/v1/jobs", json=body).json()["id"])
    late = finished(server, server.client.post("/v1/jobs", json={**body, "cfg_start": 0.3}).json()["id"])
    assert late["state"] == "done" and late["params"]["cfg_start"] == 0.3 and plain["params"]["cfg_start"] == 0.0
    assert "CFG start: 0.3" in late["images"][0]["infotext"] and "CFG start" not in plain["images"][0]["infotext"]
    # the model file's prompt completion is on unless the job turns it off (estable.prompt_completion)
    literal = finished(server, server.client.post("/v1/jobs", json={**body, "complete_prompt": False}).json()["id"])
    assert literal["state"] == "done" and plain["params"]["complete_prompt"] is True
    assert literal["params"]["complete_prompt"] is False
    assert server.client.post("/v1/jobs", json={**body, "complete_prompt": "maybe"}).status_code == 422


def test_img2img_and_inpaint_jobs(server):
    img = png_b64(Image.new("RGB", (TINY, TINY), (200, 30, 30)))
    mask = png_b64(Image.new("L", (TINY, TINY), 255))
    a = server.client.post("/v1/jobs", json={"mode": "img2img", "init_image": img, "strength": 0.5, "steps": 4})
    b = server.client.post("/v1/jobs", json={"mode": "inpaint", "init_image": img, "mask": mask, "steps": 2})
    assert a.status_code == b.status_code == 202
    ja, jb = finished(server, a.json()["id"]), finished(server, b.json()["id"])
    assert ja["state"] == jb["state"] == "done" and ja["mode"] == "img2img" and jb["mode"] == "inpaint"
    assert ja["steps"] == 2  # strength 0.5 of 4 steps
    assert "Denoising strength: 0.5" in ja["images"][0]["infotext"]


def test_history_paging(server):
    ids = [server.client.post("/v1/jobs", json={"prompt": f"p{k}", "steps": 1}).json()["id"] for k in range(3)]
    for i in ids:
        finished(server, i)
    page = server.client.get("/v1/jobs", params={"limit": 2, "offset": 0}).json()
    assert set(page) == {"jobs", "total"} and page["total"] >= 3
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]  # newest first
    nxt = server.client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert nxt["jobs"][0]["id"] == ids[0]
    assert all(set(j) == JOB_KEYS and j["preview"] is None for j in page["jobs"])
    assert server.client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_events_stream_progress_until_done(server):
    job = server.client.post("/v1/jobs", json={"prompt": "x", "steps": 12, "width": TINY, "height": TINY}).json()
    events = []
    with server.client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) >= 3 and events[-1]["state"] == "done" and len(events[-1]["images"]) == 1
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 12
    assert any(e["state"] == "running" and 0 < e["progress"] < 1 for e in events)
    assert any(e["preview"] for e in events)  # previews while running
    # a finished job's stream: one event, then closed
    with server.client.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        again = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert len(again) == 1 and again[0]["state"] == "done"
    assert server.client.get("/v1/jobs/nope/events").status_code == 404


def test_head_is_the_get_without_its_body(server):
    """HEAD on every GET route answers GET's status and headers with no body (it was 405); on a running job's event
    stream it answers at once, the stream ends and the job runs on."""
    for path in ("/", "/health/live", "/v1/config", "/v1/jobs", "/sdapi/v1/samplers", "/web/app.js", "/metrics"):
        get, head = server.client.get(path), server.client.head(path)
        assert get.status_code == head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path != "/metrics":  # the metrics count the requests, so they grow between the two
            assert head.headers["content-length"] == get.headers["content-length"], path
    assert server.client.head("/v1/jobs/nope").status_code == 404
    assert server.client.head("/sdapi/v1/txt2img").status_code == 405  # POST only
    job = server.client.post("/v1/jobs", json={"prompt": "x", "steps": 40, "width": TINY, "height": TINY}).json()
    head = server.client.head(f"/v1/jobs/{job['id']}/events")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")
    assert server.client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running")
    assert finished(server, job["id"])["state"] == "done"


def test_events_stream_sends_the_end_of_a_job_that_ends_while_its_view_is_made(server, monkeypatch):
    """The worker may finish a job between the stream's look at it and the view it sends: the stream must then
    still send the ended job before it closes, not close on a view that says running."""
    import estable.server.api as api
    from estable.params import GenerationParams
    from estable.server.worker import Job

    job = Job(mode="txt2img", params=GenerationParams(prompt="x", steps=2, seed=1), state="running")
    real_view = api.job_view
    calls = []

    def view_then_finish(j, **kw):  # the first view in the stream says running; the job ends right after it
        v = real_view(j, **kw)
        calls.append(v["state"])
        if len(calls) == 2:
            j.state = "done"
        return v

    server.state.worker.jobs[job.id] = job
    monkeypatch.setattr(api, "job_view", view_then_finish)
    try:
        with server.client.stream("GET", f"/v1/jobs/{job.id}/events") as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    finally:
        server.state.worker.jobs.pop(job.id, None)
    assert [e["state"] for e in events] == ["running", "done"]


def test_cancel_running_and_queued_then_delete(server):
    running = server.client.post("/v1/jobs", json={"prompt": "x", "steps": 50}).json()
    queued = server.client.post("/v1/jobs", json={"prompt": "y", "steps": 50}).json()
    wait_for(lambda: server.client.get(f"/v1/jobs/{running['id']}").json()["step"] >= 1)
    r = server.client.delete(f"/v1/jobs/{queued['id']}").json()
    assert r == {"id": queued["id"], "deleted": False, "state": "cancelled"}
    r = server.client.delete(f"/v1/jobs/{running['id']}").json()
    assert r == {"id": running["id"], "deleted": False, "state": "cancelled"}
    got = server.client.get(f"/v1/jobs/{running['id']}").json()
    assert got["state"] == "cancelled" and got["step"] < 50 and got["images"] == []
    assert queued["id"] not in server.state.worker.runs  # never started
    # deleting a finished job removes it and its files
    done = finished(server, server.client.post("/v1/jobs", json={"prompt": "z", "steps": 1}).json()["id"])
    path = server.state.store.image_path(done["images"][0]["id"])
    assert path.is_file()
    r = server.client.delete(f"/v1/jobs/{done['id']}").json()
    assert r == {"id": done["id"], "deleted": True, "state": "done"}
    assert not path.exists() and server.client.get(f"/v1/jobs/{done['id']}").status_code == 404
    assert server.client.get(done["images"][0]["url"]).status_code == 404
    assert server.client.delete(f"/v1/jobs/{done['id']}").status_code == 404


def test_models_samplers_config(server):
    models = server.client.get("/v1/models").json()["models"]
    assert models[-1] == {"name": "tiny", "hash": models[-1]["hash"], "current": True}
    assert re.fullmatch(r"[0-9a-f]{10}", models[-1]["hash"])
    samplers = server.client.get("/v1/samplers").json()["samplers"]
    assert {"name": "dpmpp_2m_karras", "label": "DPM++ 2M Karras"} in samplers
    cfg = server.client.get("/v1/config").json()
    assert cfg["defaults"] == {"steps": 25, "cfg_scale": 7.0, "width": TINY, "height": TINY,
                               "sampler": "dpmpp_2m_karras", "prompt_completion": None}
    assert cfg["limits"] == {"max_width": 256, "max_height": 256, "max_steps": 60, "max_batch_size": 8,
                             "max_prompt_length": 4000, "max_job_pixels": 8 * 2**20}
    assert cfg["auth"] is False


def test_openapi_and_offline_docs_and_page(server):
    schema = server.client.get("/openapi.json").json()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs", "/v1/jobs/{job_id}/events",
                 "/health/ready", "/metrics"):
        assert path in schema["paths"], path
    docs = server.client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert "/sdapi/v1/txt2img" in docs.text and "/openapi.json" in docs.text
    # nothing fetched from elsewhere: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", docs.text), "external asset in /docs"
    assert server.client.get("/redoc").status_code == 404
    page = server.client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert server.client.get("/web/index.html").status_code == 200


def test_health_and_metrics(server):
    assert server.client.get("/health/live").json() == {"status": "live"}
    assert server.client.get("/health/ready").json() == {"status": "ready", "model": "tiny"}
    server.client.post("/sdapi/v1/txt2img", json={"prompt": "m", "steps": 1, "batch_size": 2})
    text = server.client.get("/metrics").text
    assert re.search(r'estable_http_requests_total\{method="POST",route="/sdapi/v1/txt2img",status="200"\} \d',
                     text)
    assert re.search(r'estable_http_request_duration_seconds_bucket\{le="[\d.+Inf]+",route="/v1/jobs"\}', text)
    assert "estable_queue_depth 0.0" in text
    done = int(float(re.search(r'estable_jobs\{state="done"\} ([\d.]+)', text).group(1)))
    assert done == server.state.store.count_by_state()["done"] >= 1
    images = float(re.search(r"estable_images_generated_total ([\d.]+)", text).group(1))
    assert images >= 2
    assert "# TYPE estable_gpu_memory_bytes gauge" in text
    assert 'route="/v1/jobs/{job_id}"' in text and not re.search(r'route="/v1/jobs/[0-9a-f]{32}"', text)


class SlowLoad(Worker):
    def _load(self, entry):
        time.sleep(1.0)
        super()._load(entry)


def test_ready_only_after_load_and_warm_up(model, tmp_path):
    s = LiveServer(settings(tmp_path, model), worker_class=SlowLoad, wait_ready=False)
    try:
        assert s.client.get("/health/live").status_code == 200
        r = s.client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        s.wait_ready()
        assert s.state.worker.runs == {}  # the warm-up is not a job
        assert s.state.store.list_jobs(10, 0)[1] == 0
    finally:
        s.stop()


def test_broken_model_is_not_ready_and_jobs_fail(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    s = LiveServer(settings(tmp_path / "d", bad), wait_ready=False)
    try:
        wait_for(lambda: s.client.get("/health/ready").json()["status"] == "failed")
        job = s.client.post("/v1/jobs", json={"prompt": "x"}).json()
        got = finished(s, job["id"])
        assert got["state"] == "failed" and "cannot load the model" in got["error"]
    finally:
        s.stop()
