"""Operations over real HTTP: restart with jobs in the store, CUDA out-of-memory recovery, a full queue, the per-job
timeout, a client that hangs up, the drain (in process, and SIGTERM to a real `estable serve` with no model flag,
i.e. the built-in model), a bounded load test, and the built-in model through the A1111 API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from estable.checkpoints.io import sha256_file
from estable.pipeline import DEFAULT_MODEL_PATH
from estable.server.store import JobStore
from estable.server.worker import Worker
from server_util import TINY, LiveServer, SlowWorker, decode_png, make_tiny_model, settings, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny.safetensors")


def finished(server, job_id):
    return wait_for(lambda: (j := server.client.get(f"/v1/jobs/{job_id}").json())["state"] in
                    ("done", "failed", "cancelled", "interrupted") and j)


def test_restart_keeps_finished_jobs_and_interrupts_unfinished(model, tmp_path):
    s = LiveServer(settings(tmp_path, model, warmup=False))
    try:
        done = finished(s, s.client.post("/v1/jobs", json={"prompt": "keep me", "steps": 1}).json()["id"])
    finally:
        s.stop()
    # a crash left two jobs behind as they were: one running, one queued
    store = JobStore(tmp_path)
    for job_id, state in (("a" * 32, "running"), ("b" * 32, "queued")):
        store.add_job(job_id, mode="txt2img", origin="api", model="tiny", params={"prompt": "lost"}, steps=4,
                      created=time.time())
        store.update_job(job_id, state=state, step=2 if state == "running" else 0)
    store.close()
    s = LiveServer(settings(tmp_path, model, warmup=False))
    try:
        assert s.state.store.recovered == 2
        again = s.client.get(f"/v1/jobs/{done['id']}").json()
        assert again["state"] == "done" and again["images"] == done["images"]
        assert s.client.get(done["images"][0]["url"]).status_code == 200
        for job_id in ("a" * 32, "b" * 32):
            lost = s.client.get(f"/v1/jobs/{job_id}").json()
            assert lost["state"] == "interrupted" and "stopped" in lost["error"] and lost["finished"]
        assert s.client.get("/v1/jobs").json()["total"] == 3
    finally:
        s.stop()


class OOMOnce(Worker):
    failed = False
    frees = 0

    def _free_memory(self):
        OOMOnce.frees += 1
        super()._free_memory()

    def generate(self, job, params, callback):
        if not OOMOnce.failed:
            OOMOnce.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().generate(job, params, callback)


def test_out_of_memory_fails_one_job_and_the_next_succeeds(model, tmp_path):
    s = LiveServer(settings(tmp_path, model, warmup=False), worker_class=OOMOnce)
    try:
        frees = OOMOnce.frees
        r = s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 500 and "out of GPU memory" in r.json()["detail"]
        assert OOMOnce.frees == frees + 1  # memory freed after the failure
        job = s.client.get("/v1/jobs").json()["jobs"][0]
        assert job["state"] == "failed" and "lower the size" in job["error"]
        r = s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        assert s.client.get("/health/ready").status_code == 200
    finally:
        s.stop()


def test_full_queue_timeout_and_disconnect(model, tmp_path):
    s = LiveServer(settings(tmp_path, model, warmup=False, queue_size=1, job_timeout=0.5), worker_class=SlowWorker)
    try:
        c = s.client
        first = c.post("/v1/jobs", json={"prompt": "1", "steps": 50}).json()  # runs ~2.5 s, times out at 0.5 s
        wait_for(lambda: s.state.worker.current is not None)
        second = c.post("/v1/jobs", json={"prompt": "2", "steps": 2}).json()  # waits
        r = c.post("/v1/jobs", json={"prompt": "3", "steps": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "3", "steps": 2})
        assert r.status_code == 503 and "retry-after" in r.headers
        got = finished(s, first["id"])
        assert got["state"] == "failed" and "timeout of 0.5 s" in got["error"]
        assert finished(s, second["id"])["state"] == "done"
    finally:
        s.stop()
    # a synchronous A1111 call whose client hangs up has its job cancelled (a job of ~3 s, no short timeout, so
    # that a loaded machine still notices the hang-up long before the job would end)
    s = LiveServer(settings(tmp_path / "b", model, warmup=False), worker_class=SlowWorker)
    try:
        c = s.client
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=s.url, timeout=0.3) as quick:
            quick.post("/sdapi/v1/txt2img", json={"prompt": "gone", "steps": 60})
        job = wait_for(lambda: (j := c.get("/v1/jobs").json()["jobs"][0])["state"] != "running"
                       and j["state"] != "queued" and j)
        assert job["params"]["prompt"] == "gone" and job["state"] == "cancelled"
    finally:
        s.stop()


def test_drain_interrupts_what_outlives_the_grace(model, tmp_path):
    s = LiveServer(settings(tmp_path, model, warmup=False), worker_class=SlowWorker)
    try:
        long = s.client.post("/v1/jobs", json={"prompt": "long", "steps": 60}).json()
        queued = s.client.post("/v1/jobs", json={"prompt": "next", "steps": 60}).json()
        wait_for(lambda: s.state.worker.current is not None)
        threading.Thread(target=s.state.worker.drain, args=(0.3,), daemon=True).start()
        wait_for(lambda: s.state.worker.draining)
        r = s.client.post("/v1/jobs", json={"prompt": "late"})
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]
        assert s.client.get("/health/ready").json()["status"] == "draining"
        assert finished(s, long["id"])["state"] == "interrupted"
        assert finished(s, queued["id"])["state"] == "interrupted"
    finally:
        s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_and_exits_0_with_the_builtin_model(tmp_path):
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no built-in model in this checkout")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "estable.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path), "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

        def ready():
            try:
                return c.get("/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=90, every=0.2)
        job = c.post("/v1/jobs", json={"prompt": "a red circle", "steps": 20, "seed": 5, "width": 128,
                                                "height": 128}).json()
        wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["step"] >= 1)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: c.get("/health/ready").status_code == 503)
        r = c.post("/v1/jobs", json={"prompt": "too late"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"  # still finishing
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read()
    assert '"event": "draining"' in err and "SIGTERM" in err
    store = JobStore(tmp_path)
    row = store.get_job(job["id"])
    assert row["state"] == "done" and len(row["images"]) == 1 and row["model"] == "default_model"
    assert store.image_path(row["images"][0]["id"]).is_file()
    assert store.count_by_state()["done"] == 1  # the refused job was never stored


def test_port_0_prints_the_port_it_got(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "estable.cli", "serve", "--port", "0", "--data-dir", str(tmp_path),
                             "--device", "cpu"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving on" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before it said where it serves"
        port = int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        assert port > 0 and httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_builtin_model_through_a1111(tmp_path):
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no built-in model in this checkout")
    s = LiveServer(settings(tmp_path, "default", warmup=False))
    try:
        r = s.client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 64,
                                                     "height": 64, "seed": 1})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == "default_model"
        assert info["sd_model_hash"] == sha256_file(DEFAULT_MODEL_PATH)[:10]
        from estable import load_pipeline

        recommended = load_pipeline("default", device="cpu").config.default_cfg
        assert info["cfg_scale"] == recommended  # not given: the model's recommended scale, as the CLI does
        assert decode_png(r.json()["images"][0]).size == (64, 64)
        assert s.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(
            "default_model.safetensors [")
    finally:
        s.stop()


def test_load_200_requests_at_concurrency_16(model, tmp_path):
    """Bounded load: 200 synchronous A1111 calls from 16 threads; every one answered with its own image, every
    job run exactly once, none lost. Prints p50/p99 latency (pytest -s)."""
    s = LiveServer(settings(tmp_path, model, warmup=False, queue_size=16))
    n, workers = 200, 16
    local = threading.local()

    def call(k: int):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=s.url, timeout=120)
        t0 = time.perf_counter()
        r = local.client.post("/sdapi/v1/txt2img", json={"prompt": f"job {k}", "seed": k, "steps": 1,
                                                         "width": TINY, "height": TINY})
        return k, r.status_code, r.json(), time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(call, range(n)))
        wall = time.perf_counter() - t0
        lat = np.array([x[3] for x in results])
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(f"\nload: {n} requests, concurrency {workers}: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"{n / wall:.1f} req/s, wall {wall:.1f} s")
        assert all(code == 200 for _, code, _, _ in results), [c for _, c, _, _ in results if c != 200][:5]
        for k, _, body, _ in results:
            info = json.loads(body["info"])
            assert info["all_seeds"] == [k] and info["prompt"] == f"job {k}" and len(body["images"]) == 1
        runs = s.state.worker.runs
        assert len(runs) == n and set(runs.values()) == {1}  # none lost, none run twice
        assert s.state.store.count_by_state()["done"] == n
        text = s.client.get("/metrics").text
        assert f"estable_images_generated_total {float(n)}" in text
    finally:
        s.stop()


def test_model_recommended_sampler_and_cfg_where_the_request_names_none(model, tmp_path):
    import dataclasses

    from estable.checkpoints.store import load_model, save_model

    loaded = load_model(model)
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, default_cfg=4.0,
                                                                     default_sampler="euler"))
    tuned = save_model(loaded, tmp_path / "tuned.safetensors", to="estable")
    s = LiveServer(settings(tmp_path / "d", tuned, warmup=False))
    try:
        defaults = s.client.get("/v1/config").json()["defaults"]
        assert defaults["sampler"] == "euler" and defaults["cfg_scale"] == 4.0
        plain = finished(s, s.client.post("/v1/jobs", json={"prompt": "x", "steps": 1}).json()["id"])
        chosen = finished(s, s.client.post("/v1/jobs", json={"prompt": "x", "steps": 1, "sampler": "ddim",
                                                               "cfg_scale": 6}).json()["id"])
        assert (plain["params"]["sampler"], plain["params"]["cfg_scale"]) == ("euler", 4.0)
        assert (chosen["params"]["sampler"], chosen["params"]["cfg_scale"]) == ("ddim", 6.0)
        for body, label in (({}, "Euler"), ({"sampler_name": "DDIM"}, "DDIM")):
            r = s.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **body})
            assert r.status_code == 200, r.text
            assert json.loads(r.json()["info"])["sampler_name"] == label
    finally:
        s.stop()
