"""An A1111 client used unchanged: the `webuiapi` package (a test-time oracle, as diffusers is for the pipeline),
written for the A1111 web UI, drives the server over real HTTP: txt2img, img2img with a mask, png-info, samplers,
schedulers, models and switching, options, progress, interrupt, basic auth."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from server_util import TINY, LiveServer, SlowWorker, make_tiny_model, settings, wait_for

webuiapi = pytest.importorskip("webuiapi")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny.safetensors", seed=0)
    make_tiny_model(root / "other.safetensors", seed=1)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    s = LiveServer(settings(tmp_path_factory.mktemp("data"), "tiny", models_dir=models, preview_interval=0.01,
                            api_auth=("ann", "pw-of-ann")), worker_class=SlowWorker)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2, username="ann",
                             password="pw-of-ann")


def test_txt2img_as_a1111_clients_call_it(api):
    r = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, width=TINY, height=TINY, batch_size=2,
                    cfg_scale=5)
    assert len(r.images) == 2 and all(im.size == (TINY, TINY) for im in r.images)
    assert r.info["all_seeds"] == [11, 12] and r.info["sd_model_name"] == "tiny"
    assert r.parameters["prompt"] == "a red circle" and r.parameters["sampler_name"] == "Euler a"
    assert r.image.info["parameters"] == r.info["infotexts"][0]  # the PNG's text chunk, read back by Pillow
    again = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=11, width=TINY, height=TINY,
                        cfg_scale=5)
    assert np.array_equal(np.asarray(again.image), np.asarray(r.images[0]))


def test_img2img_with_mask(api):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (TINY, TINY, 3), dtype=np.uint8))
    mask = Image.new("L", (TINY, TINY), 0)
    mask.paste(255, (0, 0, TINY // 2, TINY))
    r = api.img2img(images=[init], mask_image=mask, prompt="x", seed=2, width=TINY, height=TINY,
                    denoising_strength=0.9, steps=4)
    assert r.image.size == (TINY, TINY) and r.info["denoising_strength"] == 0.9
    plain = api.img2img(images=[init], prompt="x", seed=2, width=TINY, height=TINY, denoising_strength=0.9,
                        steps=4)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(r.image))  # the mask made a difference


def test_png_info_samplers_schedulers_and_models(api):
    made = api.txt2img(prompt="read me back", seed=3, width=TINY, height=TINY)
    info = api.png_info(made.image)
    assert info.info == made.info["infotexts"][0]
    assert info.json["parameters"]["Prompt"] == "read me back"
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    names = api.util_get_model_names()
    assert any(n.startswith("other.safetensors") for n in names)
    api.util_set_model("other")  # finds the closest title, as it does against A1111
    assert api.util_get_current_model().startswith("other.safetensors [")
    assert api.txt2img(prompt="x", seed=3, width=TINY, height=TINY).info["sd_model_name"] == "other"
    api.util_set_model("tiny")
    assert api.util_get_current_model().startswith("tiny.safetensors [")
    api.refresh_checkpoints()
    assert api.get_options()["samples_format"] == "png"
    for getter in (api.get_sd_vae, api.get_upscalers, api.get_loras, api.get_embeddings, api.get_scripts,
                   api.get_cmd_flags, api.get_face_restorers, api.get_prompt_styles):
        getter()  # the discovery calls a client makes on connecting all answer


def test_progress_interrupt_and_wait_for_ready(api, server):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", api.txt2img(prompt="long", steps=40, width=TINY,
                                                                        height=TINY)))
    t.start()
    p = wait_for(lambda: (q := api.get_progress())["current_image"] and q)
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] >= 1
    api.interrupt()
    t.join(30)
    assert box["r"].images == []
    api.util_wait_for_ready(check_interval=0.05)
    assert api.get_progress()["progress"] == 0.0


def test_wrong_credentials_are_refused(server):
    bad = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="ann", password="nope")
    with pytest.raises(RuntimeError) as err:
        bad.txt2img(prompt="x", width=TINY, height=TINY, steps=1)
    assert err.value.args[0] == 401
