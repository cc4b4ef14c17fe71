"""A1111's API (/sdapi/v1) over real HTTP against a real uvicorn, on a tiny random model: every route, the response
shapes field by field (REFERENCES.md, A1111 web API), inpainting, model switching, progress, interrupt and skip."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from estable.provenance.infotext import parse_infotext
from server_util import TINY, LiveServer, SlowWorker, decode_png, make_tiny_model, png_b64, settings, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny.safetensors", seed=0)
    make_tiny_model(root / "other.safetensors", seed=1)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    s = LiveServer(settings(tmp_path_factory.mktemp("data"), "tiny", models_dir=models, preview_interval=0.01),
                   worker_class=SlowWorker)
    yield s
    s.stop()


def txt2img(server, **body):
    body = {"prompt": "a red circle", "steps": 2, "seed": 7, **body}
    return server.client.post("/sdapi/v1/txt2img", json=body)


def test_txt2img_response_shape_field_by_field(server):
    r = txt2img(server, negative_prompt="blue", batch_size=2, n_iter=1, cfg_scale=4.5, sampler_name="Euler a",
                width=TINY, height=TINY, some_unknown_field={"x": 1}, send_images=True)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    assert len(out["images"]) == 2
    # parameters: the request echoed (A1111 fields with their defaults), unknown fields dropped
    p = out["parameters"]
    assert p["prompt"] == "a red circle" and p["negative_prompt"] == "blue" and p["seed"] == 7
    assert p["batch_size"] == 2 and p["n_iter"] == 1 and p["cfg_scale"] == 4.5 and p["sampler_name"] == "Euler a"
    assert p["send_images"] is True and p["save_images"] is False and "some_unknown_field" not in p
    # info: a JSON *string*
    assert isinstance(out["info"], str)
    info = json.loads(out["info"])
    for key in ("prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                "all_subseeds", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
                "sd_model_name", "sd_model_hash", "infotexts", "index_of_first_image", "job_timestamp", "clip_skip",
                "denoising_strength", "extra_generation_params", "styles", "version"):
        assert key in info, key
    assert info["prompt"] == "a red circle" and info["all_prompts"] == ["a red circle"] * 2
    assert info["negative_prompt"] == "blue" and info["all_negative_prompts"] == ["blue"] * 2
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]
    assert (info["width"], info["height"]) == (TINY, TINY)
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 4.5 and info["steps"] == 2
    assert info["batch_size"] == 2 and info["sd_model_name"] == "tiny"
    assert len(info["sd_model_hash"]) == 10 and info["denoising_strength"] == 0
    assert len(info["infotexts"]) == 2
    # images: base64 PNGs carrying the A1111 "parameters" chunk, equal to info's infotexts
    for k, data in enumerate(out["images"]):
        im = decode_png(data)
        assert im.format == "PNG" and im.size == (TINY, TINY)
        assert im.text["parameters"] == info["infotexts"][k]
        parsed = parse_infotext(im.text["parameters"])
        assert parsed["prompt"] == "a red circle" and parsed["negative_prompt"] == "blue"
        assert parsed["params"]["Seed"] == str(7 + k) and parsed["params"]["Sampler"] == "Euler a"
        assert parsed["params"]["Model hash"] == info["sd_model_hash"]


def test_same_seed_same_pixels_and_send_images_false(server):
    a = txt2img(server, width=TINY, height=TINY).json()
    b = txt2img(server, width=TINY, height=TINY).json()
    c = txt2img(server, width=TINY, height=TINY, seed=8).json()
    pa, pb, pc = (np.asarray(decode_png(x["images"][0])) for x in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    r = txt2img(server, send_images=False).json()
    assert r["images"] == [] and json.loads(r["info"])["all_seeds"] == [7]


def test_n_iter_and_karras_scheduler(server):
    r = txt2img(server, batch_size=1, n_iter=2, sampler_name="DPM++ 2M", scheduler="Karras")
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 8] and len(r.json()["images"]) == 2
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert "Schedule type: Karras" in info["infotexts"][0]


def test_unknown_sampler_and_scheduler_are_400(server):
    r = txt2img(server, sampler_name="No Such Sampler")
    assert r.status_code == 400 and r.json()["detail"] == "Sampler not found"
    r = txt2img(server, sampler_name="Euler", scheduler="exponential-ish")
    assert r.status_code == 400 and "Scheduler" in r.json()["detail"]


def test_img2img_and_inpaint(server):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (TINY, TINY, 3), dtype=np.uint8))
    r = server.client.post("/sdapi/v1/img2img", json={
        "init_images": [png_b64(init)], "prompt": "x", "steps": 4, "denoising_strength": 0.5, "seed": 3,
        "resize_mode": 0, "unknown": True})
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert out["parameters"]["init_images"] is None  # A1111 leaves them out unless include_init_images
    assert decode_png(out["images"][0]).size == (TINY, TINY)

    # inpainting. The tiny VAE's mid-block attention spreads any latent change over the whole picture, so pixels
    # cannot show the kept region exactly (the pipeline tests do that against diffusers); here the repainted side
    # must change clearly more than the kept side, compared with an all-black mask (which keeps everything).
    def inpaint(mask, **kw):
        r = server.client.post("/sdapi/v1/img2img", json={
            "init_images": [png_b64(init)], "mask": png_b64(mask), "prompt": "x", "steps": 4,
            "denoising_strength": 1.0, "seed": 3, "mask_blur": 4, "inpainting_fill": 1, **kw})
        assert r.status_code == 200, r.text
        return np.asarray(decode_png(r.json()["images"][0]).convert("RGB")).astype(int)

    black = Image.new("L", (TINY, TINY), 0)
    r = server.client.post("/sdapi/v1/img2img", json={"init_images": [png_b64(init)], "mask": png_b64(black),
                                                      "prompt": "x", "steps": 4})
    assert r.status_code == 422 and "nothing to repaint" in r.text  # as the CLI: an all-black mask is refused
    speck = black.copy()
    speck.putpixel((0, 0), 255)  # one white pixel: below the latent grid's resolution, so it keeps everything
    kept = inpaint(speck)
    assert server.client.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]["mode"] == "inpaint"
    mask = Image.new("L", (TINY // 2, TINY // 2), 0)  # a smaller mask is resized to the image, as A1111 does
    mask.paste(255, (0, 0, TINY // 4, TINY // 2))  # repaint the left half
    h = TINY // 2

    def diffs(got):
        return np.abs(got[:, :h] - kept[:, :h]).mean(), np.abs(got[:, h:] - kept[:, h:]).mean()

    left, right = diffs(inpaint(mask))
    assert left > 1.3 * right, (left, right)
    left, right = diffs(inpaint(mask, inpainting_mask_invert=1))
    assert right > 1.3 * left, (left, right)


def test_img2img_without_image_is_404(server):
    r = server.client.post("/sdapi/v1/img2img", json={"prompt": "x"})
    assert r.status_code == 404 and r.json()["detail"] == "Init image not found"


def test_png_info(server):
    out = txt2img(server, width=TINY, height=TINY).json()
    r = server.client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + out["images"][0]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == {"info", "items", "parameters"}
    assert got["info"] == json.loads(out["info"])["infotexts"][0]
    assert got["parameters"]["Prompt"] == "a red circle" and got["parameters"]["Seed"] == "7"
    assert got["parameters"]["Size-1"] == str(TINY) and got["parameters"]["Size-2"] == str(TINY)
    assert "estable" in got["items"] and "parameters" not in got["items"]
    plain = server.client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_samplers_schedulers_models(server):
    samplers = server.client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "LCM"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert "euler_a" in samplers[names.index("Euler a")]["aliases"]
    scheds = server.client.get("/sdapi/v1/schedulers").json()
    assert [s["name"] for s in scheds] == ["automatic", "karras"]
    assert all({"name", "label", "aliases", "default_rho", "need_inner_model"} == set(s) for s in scheds)
    models = server.client.get("/sdapi/v1/sd-models").json()
    by_name = {m["model_name"]: m for m in models}
    assert {"tiny", "other"} <= set(by_name)
    for m in models:
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert by_name["tiny"]["title"] == f"tiny.safetensors [{by_name['tiny']['hash']}]"  # loaded: hash known


def test_options_switch_models_and_refresh(server, models):
    opts = server.client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"].startswith("tiny.safetensors [")
    assert opts["samples_format"] == "png" and opts["CLIP_stop_at_last_layers"] == 1
    before = np.asarray(decode_png(txt2img(server, width=TINY, height=TINY).json()["images"][0]))
    r = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors",
                                                      "some_ui_option": 3})
    assert r.status_code == 200, r.text
    opts = server.client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"].startswith("other.safetensors [") and opts["some_ui_option"] == 3
    out = txt2img(server, width=TINY, height=TINY).json()
    assert json.loads(out["info"])["sd_model_name"] == "other"
    assert not np.array_equal(before, np.asarray(decode_png(out["images"][0])))  # other weights, other image
    # an A1111 title with a hash works too; then back to tiny
    title = next(m["title"] for m in server.client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny")
    assert server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
    assert json.loads(txt2img(server).json()["info"])["sd_model_name"] == "tiny"
    # names outside the folder, or unknown, are refused
    for bad in ("../tiny.safetensors", "/etc/passwd", "nope"):
        r = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
        assert r.status_code == 400, (bad, r.text)
    # refresh-checkpoints finds a model copied in later
    shutil.copy(models / "tiny.safetensors", models / "late.safetensors")
    assert "late" not in {m["model_name"] for m in server.client.get("/sdapi/v1/sd-models").json()}
    assert server.client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "late" in {m["model_name"] for m in server.client.get("/sdapi/v1/sd-models").json()}
    # override_settings picks the model for one request
    r = txt2img(server, override_settings={"sd_model_checkpoint": "late"})
    assert json.loads(r.json()["info"])["sd_model_name"] == "late"
    assert txt2img(server, override_settings={"sd_model_checkpoint": "../x"}).status_code == 400


def _in_background(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()))
    t.start()
    return t, box


def test_a_finished_job_is_no_longer_current_when_its_caller_wakes(server):
    """The worker lets a job go before it wakes whoever waits on it, so the caller's next /progress reads idle, not
    the finished job at 100 % (a race that once failed test_progress_with_preview_then_interrupt)."""
    from estable.params import GenerationParams
    from estable.server.worker import Job

    worker = server.state.worker
    job = Job(mode="txt2img", params=GenerationParams(prompt="a red circle", steps=2, seed=7, width=TINY, height=TINY))
    seen = []
    job.on_done(lambda: seen.append(worker.current))
    worker.submit(job)
    assert job.done.wait(30) and job.state == "done"
    assert seen == [None]
    assert server.client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_progress_with_preview_then_interrupt(server):
    idle = server.client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    t, box = _in_background(lambda: txt2img(server, steps=40, width=TINY, height=TINY))
    seen = wait_for(lambda: (p := server.client.get("/sdapi/v1/progress").json())["current_image"] and p)
    assert set(seen) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 40
    assert 1 <= seen["state"]["sampling_step"] <= 40 and seen["state"]["job"].startswith("task(")
    assert decode_png(seen["current_image"]).size == (TINY, TINY)
    assert server.client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] \
        is None
    assert server.client.post("/sdapi/v1/interrupt").json() == {}
    t.join(30)
    r = box["r"]
    assert r.status_code == 200 and r.json()["images"] == []  # stopped before its only batch finished
    job = server.client.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert job["state"] == "interrupted" and job["step"] < 40


def test_skip_drops_one_batch(server):
    t, box = _in_background(lambda: txt2img(server, steps=30, n_iter=2, width=TINY, height=TINY))
    wait_for(lambda: server.state.worker.current is not None and server.state.worker.current.step >= 1)
    assert server.client.post("/sdapi/v1/skip").status_code == 200
    t.join(30)
    r = box["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [8] and len(r.json()["images"]) == 1  # batch 0 (seed 7) skipped, batch 1 ran


def test_failed_switch_keeps_serving_the_model_it_had(server, models):
    (models / "broken.safetensors").write_bytes(b"not a checkpoint")
    try:
        server.client.post("/sdapi/v1/refresh-checkpoints")
        before = server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        r = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
        assert r.status_code == 400 and "broken" in r.json()["detail"]
        assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
        assert txt2img(server).status_code == 200
    finally:
        (models / "broken.safetensors").unlink()
        server.client.post("/sdapi/v1/refresh-checkpoints")


def test_discovery_routes_a1111_clients_call(server):
    for route in ("sd-vae", "loras", "hypernetworks", "face-restorers", "prompt-styles", "realesrgan-models"):
        assert server.client.get(f"/sdapi/v1/{route}").json() == [], route
    assert server.client.get("/sdapi/v1/upscalers").json()[0]["name"] == "None"
    assert server.client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert server.client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert server.client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    mem = server.client.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > mem["ram"]["free"] > 0 and "cuda" in mem


def test_all_prompts_are_the_images_own_with_a_prompt_completion(tmp_path):
    """A model whose file names a prompt completion: info's all_prompts and infotexts hold each image's completed
    prompt (seed by seed), its prompt field the request's."""
    from estable.prompt_completion import complete_prompt

    name = "shapes-grey-background"
    make_tiny_model(tmp_path / "models" / "grey.safetensors", prompt_completion=name)
    s = LiveServer(settings(tmp_path / "data", "grey", models_dir=tmp_path / "models", warmup=False))
    try:
        r = txt2img(s, batch_size=3, width=TINY, height=TINY)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["prompt"] == "a red circle"
        assert info["all_prompts"] == [complete_prompt(name, "a red circle", seed) for seed in (7, 8, 9)]
        assert [parse_infotext(t)["prompt"] for t in info["infotexts"]] == info["all_prompts"]
    finally:
        s.stop()
