"""The server does what `estable generate` does beyond plain generation, through the same library code: provenance
(watermark, record, signature; --no-watermark), the prompt filter and the output check, LoRA prompt tags,
textual-inversion embeddings and ControlNet (A1111's ControlNet extension API and /v1/jobs' control list). Real HTTP
against a real uvicorn on a tiny random model; server images are compared with the library's for the same seed."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from estable import GenerationParams, load_pipeline
from estable.checkpoints.controlnet_format import save_controlnet
from estable.checkpoints.io import write_safetensors
from estable.checkpoints.lora_format import kohya_name
from estable.control import ControlUnit
from estable.embeddings import EmbeddingLibrary, save_embedding
from estable.models.controlnet import ControlNet
from estable.provenance.infotext import PARAMETERS_KEY, parse_infotext
from estable.provenance.records import new_keypair
from estable.provenance.verify import check_record
from estable.provenance.watermark import detect_dwtdct
from server_util import TINY, LiveServer, decode_png, make_tiny_model, png_b64, settings, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SEED, CFG = 3, 11, 5.0
BASE = {"steps": STEPS, "seed": SEED, "cfg_scale": CFG, "sampler_name": "euler", "width": TINY, "height": TINY}


def _random_lora(pipe, path: Path, seed: int) -> Path:
    """A random kohya-named LoRA over the tiny U-Net's and text encoder's attention layers."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_v", "q_proj", "v_proj")):
                key = kohya_name(component, name)
                tensors[f"{key}.lora_down.weight"] = torch.randn(2, m.in_features, generator=g) / m.in_features**0.5
                tensors[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 2, generator=g) * 2
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
    write_safetensors(path, tensors, {"ss_output_name": "styleAlias"})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    model = make_tiny_model(root / "tiny.safetensors")
    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    (root / "loras" / "sub").mkdir(parents=True)
    _random_lora(pipe, root / "loras" / "sub" / "style.safetensors", 1)
    (root / "emb").mkdir()
    width = pipe.config.text.width
    scale = pipe.text_encoder.text_model.embeddings.token_embedding.weight.std().item()
    g = torch.Generator().manual_seed(5)
    save_embedding(root / "emb" / "shinyred.safetensors", torch.randn(2, width, generator=g) * scale * 4)
    save_embedding(root / "emb" / "widevec.safetensors", torch.randn(1, width + 8, generator=g))  # another model's
    torch.save({"string_to_param": {"*": torch.randn(3, width, generator=g)}, "step": 500, "sd_checkpoint": "abcd",
                "sd_checkpoint_name": "base"}, root / "emb" / "oldstyle.pt")
    net = ControlNet.from_unet(pipe.unet)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    (root / "cn").mkdir()
    save_controlnet(net, root / "cn" / "cn_edges.safetensors")
    a = np.zeros((TINY, TINY, 3), np.uint8)
    a[4:28, 14:18] = 255
    a[8:11, 2:30] = 255
    control_image = Image.fromarray(a)
    (root / "blocked.txt").write_text("# test list\nforbidden\n")
    private, _, public_hex = new_keypair(root / "keys")
    return {"root": root, "model": model, "pipe": pipe, "net": net, "control_image": control_image,
            "sign_key": private, "public": public_hex}


def _settings(world, data: Path, **kw):
    r = world["root"]
    return settings(data, world["model"], lora_dir=r / "loras", embeddings_dir=r / "emb", controlnet_dir=r / "cn",
                    allow_pickle=True, blocklists=(r / "blocked.txt",), **kw)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    s = LiveServer(_settings(world, tmp_path_factory.mktemp("data"), sign_key=world["sign_key"]))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain(world, tmp_path_factory):
    s = LiveServer(_settings(world, tmp_path_factory.mktemp("data_plain"), watermark=False, tree_ring=True))
    yield s
    s.stop()


def _png(data: bytes | str) -> tuple[Image.Image, str, dict]:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    im = Image.open(io.BytesIO(raw))
    return im.convert("RGB"), im.text[PARAMETERS_KEY], json.loads(im.text["estable"])


def _txt2img(server, **body):
    r = server.client.post("/sdapi/v1/txt2img", json={**BASE, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _library(world, prompt: str, **kw) -> np.ndarray:
    pipe = world["pipe"]
    control = kw.pop("control", None)
    params = GenerationParams(prompt=prompt, steps=STEPS, seed=SEED, cfg_scale=CFG, sampler="euler", width=TINY,
                              height=TINY, **kw)
    return np.asarray(pipe.txt2img(params, control=control).images[0]).astype(int)


def _wait_job(server, job_id: str) -> dict:
    return wait_for(lambda: (j := server.client.get(f"/v1/jobs/{job_id}").json())["state"] in
                    ("done", "failed", "cancelled", "interrupted") and j)


# ------------------------------------------------------------------------------------------------ provenance


def test_images_carry_watermark_and_signed_record(server, world):
    out = _txt2img(server, prompt="a red circle", width=64, height=64)
    image, _, record = _png(out["images"][0])
    assert detect_dwtdct(image).found  # the library's reader finds Estable's mark
    wm = record["watermark"]["dwtdct"]
    assert wm["enabled"] and wm["applied"]
    check = check_record(image, record)
    assert check["pixels"] == "match" and check["signature"] == "valid"
    assert check["signature_detail"] == world["public"] and record["device"]["type"] == "cpu"
    # /v1/jobs images too
    job = server.client.post("/v1/jobs", json={"prompt": "a blue square", "steps": 2, "width": 64, "height": 64}).json()
    job = _wait_job(server, job["id"])
    assert job["state"] == "done", job
    r = server.client.get(job["images"][0]["url"])
    image, _, record = _png(r.content)
    assert detect_dwtdct(image).found and check_record(image, record)["signature"] == "valid"


def test_no_watermark_is_recorded(plain):
    out = _txt2img(plain, prompt="a red circle", width=64, height=64)
    image, _, record = _png(out["images"][0])
    assert not detect_dwtdct(image).found
    assert record["watermark"]["dwtdct"] == {"enabled": False}
    assert check_record(image, record) == {"present": True, "pixels": "match", "signature": "unsigned",
                                           "signature_detail": "unsigned"}


def test_tree_ring_marks_txt2img_only(plain, world):
    out = _txt2img(plain, prompt="a red circle")
    image, _, record = _png(out["images"][0])
    assert record["watermark"]["tree_ring"]["enabled"] is True
    assert np.abs(np.asarray(image).astype(int) - _library(world, "a red circle")).max() > 5  # other initial noise
    body = {**BASE, "prompt": "a red circle", "init_images": [out["images"][0]]}
    r = plain.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert _png(r.json()["images"][0])[2]["watermark"]["tree_ring"] == {"enabled": False}


# ------------------------------------------------------------------------------------------------- filters


def test_blocked_prompt_refused_everywhere(server, caplog):
    before = server.client.get("/v1/jobs").json()["total"]
    caplog.set_level("WARNING")
    for prompt in ("a F0RB!DDEN cube", "a for\u200bbidden cube", "f o r b i d d e n"):
        r = server.client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": prompt})
        assert r.status_code == 400 and "refused" in r.json()["detail"] and "forbidden" in r.json()["detail"], r.text
        r = server.client.post("/v1/jobs", json={"prompt": prompt, "steps": 2})
        assert r.status_code == 400 and "refused" in r.json()["detail"], r.text
    assert server.client.get("/v1/jobs").json()["total"] == before  # no job was made
    refusals = [r for r in caplog.records if r.name == "estable.server" and "prompt_refused" in r.getMessage()]
    assert len(refusals) == 6 and "forbidden" in refusals[0].getMessage()
    # the negative prompt is not filtered (as in the CLI), nor are words that merely contain the letters
    assert _txt2img(server, prompt="forbiddenness of a Scunthorpe class", negative_prompt="forbidden")["images"]


class _RefuseFirst:
    """An output check that refuses the first image of every batch (the wiring is tested, not CLIP)."""

    def check(self, images):
        return [("a concept", 99.0) if k == 0 else None for k in range(len(images))]


def test_output_check_refusal_writes_nothing(server):
    policy = server.state.provenance
    assert server.state.worker.provenance is policy
    policy.output_check = _RefuseFirst()
    try:
        files_before = set(server.state.store.images_dir.iterdir())
        r = server.client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a cube", "batch_size": 1})
        assert r.status_code == 400 and "output check refused 1 image" in r.json()["detail"], r.text
        assert set(server.state.store.images_dir.iterdir()) == files_before
        job = server.client.post("/v1/jobs", json={"prompt": "a cube", "steps": 2, "batch_size": 2}).json()
        job = _wait_job(server, job["id"])
        assert job["state"] == "failed" and "output check refused 1 image" in job["error"]
        assert len(job["images"]) == 1 and job["images"][0]["seed"] == job["params"]["seed"] + 1
        assert len(set(server.state.store.images_dir.iterdir()) - files_before) == 1
    finally:
        policy.output_check = None


# ----------------------------------------------------------------------------------------------------- LoRA


def test_lora_tag_matches_library(server, world):
    out = _txt2img(server, prompt="a cat <lora:style:0.8>")
    got, infotext, record = _png(out["images"][0])
    pipe = world["pipe"]
    pipe.lora_dir = world["root"] / "loras"
    try:
        expected = _library(world, "a cat <lora:style:0.8>")
        plain = _library(world, "a cat ")
    finally:
        pipe.lora_dir = None
    got = np.asarray(got).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - plain).max() > 5
    fields = parse_infotext(infotext)
    assert fields["prompt"] == "a cat <lora:style:0.8>" and fields["params"]["Lora hashes"].startswith("style: ")
    assert record["loras"][0]["name"] == "style" and record["loras"][0]["unet"] == 0.8
    # the same through /v1/jobs
    job = server.client.post("/v1/jobs", json={"prompt": "a cat <lora:style:0.8>", "steps": STEPS, "seed": SEED,
                                                "cfg_scale": CFG, "sampler": "euler", "width": TINY,
                                                "height": TINY}).json()
    job = _wait_job(server, job["id"])
    again = np.asarray(_png(server.client.get(job["images"][0]["url"]).content)[0]).astype(int)
    assert np.array_equal(again, got)


def test_lora_listing_and_errors(server):
    loras = server.client.get("/sdapi/v1/loras").json()
    assert [(x["name"], x["alias"]) for x in loras] == [("style", "styleAlias")]
    assert loras[0]["path"].endswith("style.safetensors") and loras[0]["metadata"]["ss_output_name"] == "styleAlias"
    assert server.client.post("/sdapi/v1/refresh-loras").status_code == 200
    r = server.client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a cat <lora:nothere:1>"})
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt: ") and "nothere" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"prompt": "a cat <lora:style:strong>"})
    assert r.status_code == 422 and "not a number" in r.json()["detail"]
    lora_dir = str(server.settings.lora_dir)
    r = server.client.post("/v1/jobs", json={"prompt": "a cat <lora:nothere:1>"})
    detail = r.json()["detail"]
    assert r.status_code == 422 and lora_dir not in detail and "the LoRA folder" in detail, detail
    many = " ".join(f"<lora:n{k}:1>" for k in range(17))  # each name is a folder lookup: bounded
    r = server.client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": f"a cat {many}"})
    assert r.status_code == 422 and r.json()["detail"] == "prompt: names 17 LoRAs; at most 16"


# ------------------------------------------------------------------------------------------ textual inversion


def test_embeddings_listing_refresh_and_use(server, world):
    emb = server.client.get("/sdapi/v1/embeddings").json()
    width = world["pipe"].config.text.width
    assert emb["loaded"]["shinyred"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                         "shape": width, "vectors": 2}
    assert emb["loaded"]["oldstyle"] == {"step": 500, "sd_checkpoint": "abcd", "sd_checkpoint_name": "base",
                                         "shape": width, "vectors": 3}
    assert list(emb["skipped"]) == ["widevec"] and emb["skipped"]["widevec"]["shape"] == width + 8
    new = world["root"] / "emb" / "fresh.safetensors"
    save_embedding(new, torch.ones(1, width))
    try:
        assert "fresh" not in server.client.get("/sdapi/v1/embeddings").json()["loaded"]
        assert server.client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert "fresh" in server.client.get("/sdapi/v1/embeddings").json()["loaded"]
    finally:
        new.unlink()
        server.client.post("/sdapi/v1/refresh-embeddings")
    out = _txt2img(server, prompt="a shinyred cube")
    got, infotext, _ = _png(out["images"][0])
    pipe = world["pipe"]
    pipe.embeddings = EmbeddingLibrary(world["root"] / "emb", allow_pickle=True)
    try:
        expected = _library(world, "a shinyred cube")
    finally:
        pipe.embeddings = None
    got = np.asarray(got).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - _library(world, "a shinyred cube")).max() > 5  # without the embedding: the plain words
    assert parse_infotext(infotext)["params"]["TI hashes"].startswith("shinyred: ")


# ------------------------------------------------------------------------------------------------- ControlNet


def test_controlnet_extension_api_matches_library(server, world):
    unit = {"enabled": True, "image": png_b64(world["control_image"]), "module": "none",
            "model": "cn_edges [0123abcd]", "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.75,
            "control_mode": "Balanced", "resize_mode": "Just Resize", "processor_res": 512, "pixel_perfect": False}
    out = _txt2img(server, prompt="a cat", alwayson_scripts={"ControlNet": {"args": [unit, {"enabled": False}]}})
    got, infotext, record = _png(out["images"][0])
    cu = ControlUnit(net=world["net"], image=world["control_image"], scale=0.8, end=0.75)
    expected = _library(world, "a cat", control=[cu])
    got = np.asarray(got).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - _library(world, "a cat")).max() > 5
    assert 'ControlNet 0: "Module: none, Model: cn_edges [' in infotext and "Guidance End: 0.75" in infotext
    assert record["control"][0]["scale"] == 0.8 and record["control"][0]["image"] is None
    # Estable's own API: the same unit, the same image
    job = server.client.post("/v1/jobs", json={
        "prompt": "a cat", "steps": STEPS, "seed": SEED, "cfg_scale": CFG, "sampler": "euler", "width": TINY,
        "height": TINY, "control": [{"type": "none", "image": unit["image"], "model": "cn_edges", "scale": 0.8,
                                     "end": 0.75}]}).json()
    job = _wait_job(server, job["id"])
    assert job["state"] == "done", job
    assert np.array_equal(np.asarray(_png(server.client.get(job["images"][0]["url"]).content)[0]).astype(int), got)


@pytest.mark.parametrize("change, field", [
    ({"model": "nope"}, "args.0.model"), ({"model": "../cn/cn_edges"}, "args.0.model"),
    ({"module": "depth_midas"}, "args.0.module"), ({"control_mode": 1}, "args.0.control_mode"),
    ({"control_mode": [2]}, "args.0.control_mode"),  # not a name nor a number (was a TypeError, a 500)
    ({"weight": 20}, "args.0"), ({"image": None}, "args.0.image"), ({"threshold_a": float("inf")}, "args.0"),
    ({"threshold_a": 250, "threshold_b": 100}, "args.0"),
])
def test_controlnet_bad_units_are_422(server, world, change, field):
    unit = {"image": png_b64(world["control_image"]), "module": "canny", "model": "cn_edges", **change}
    body = {**BASE, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = server.client.post("/sdapi/v1/txt2img", content=json.dumps(body),  # json.dumps: Infinity passes as clients
                           headers={"Content-Type": "application/json"})  # such as Python's json send it
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"alwayson_scripts.controlnet.{field}"), r.text
    r = server.client.post("/v1/jobs", json={"prompt": "x", "control": [{"type": "canny", "model": "nope",
                                                                         "image": png_b64(world["control_image"])}]})
    assert r.status_code == 422 and r.json()["detail"].startswith("control.0."), r.text


def test_controlnet_lists(server):
    assert server.client.get("/controlnet/model_list").json() == {"model_list": ["cn_edges"]}
    modules = server.client.get("/controlnet/module_list").json()
    assert {"none", "canny", "scribble", "invert"} <= set(modules["module_list"])
    assert set(modules["module_detail"]) == set(modules["module_list"])


def test_controlnet_detect_makes_the_librarys_control_images(server, world):
    from estable.control.preprocess import make_control_image

    source = world["control_image"].convert("RGB").resize((96, 64))
    body = {"controlnet_module": "canny", "controlnet_input_images": [png_b64(source)] * 2,
            "controlnet_processor_res": 128, "controlnet_threshold_a": 50, "controlnet_threshold_b": 120}
    r = server.client.post("/controlnet/detect", json=body)
    assert r.status_code == 200, r.text
    images = [decode_png(d).convert("RGB") for d in r.json()["images"]]
    assert r.json()["info"] == "Success" and len(images) == 2
    want = make_control_image("canny", source.resize((192, 128), Image.Resampling.LANCZOS), low=50, high=120)
    assert images[0].size == (192, 128)  # the shorter side at processor_res, the aspect kept
    assert np.array_equal(np.asarray(images[0]), np.asarray(want.convert("RGB")))
    assert np.asarray(images[0]).max() == 255  # edges were found
    not_an_image = base64.b64encode(b"not an image").decode()
    for change, status, field in (({"controlnet_module": "depth"}, 422, "controlnet_module"),
                                  ({"controlnet_input_images": []}, 422, "controlnet_input_images"),
                                  ({"controlnet_input_images": [png_b64(source)] * 9}, 422, "controlnet_input_images"),
                                  ({"controlnet_processor_res": 10_000}, 422, "controlnet_processor_res"),
                                  ({"controlnet_threshold_a": float("inf")}, 422, "controlnet_threshold_a"),
                                  ({"controlnet_threshold_a": 150, "controlnet_threshold_b": 100}, 422,
                                   "controlnet_threshold_a"),
                                  ({"controlnet_input_images": [not_an_image]}, 400, "controlnet_input_images.0")):
        r = server.client.post("/controlnet/detect", content=json.dumps({**body, **change}),
                               headers={"Content-Type": "application/json"})
        assert r.status_code == status and r.json()["detail"].startswith(field), (change, r.text)


def test_controlnet_img2img_uses_init_image(server, world):
    unit = {"module": "canny", "model": "cn_edges", "threshold_a": 50, "threshold_b": 120}
    body = {**BASE, "prompt": "a cat", "init_images": [png_b64(world["control_image"])],
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert _png(r.json()["images"][0])[2]["control"][0]["type"] == "canny"


# ------------------------------------------------------------------------------------------------ the flags


def test_serve_flags_reach_the_settings(world, tmp_path):
    from estable.cli import build_parser
    from estable.cli_serve import settings_from_args
    from estable.errors import EstableError
    from estable.server.app import create_app

    r = world["root"]
    args = build_parser().parse_args([
        "serve", "--no-watermark", "--watermark-key", "k1", "--sign-key", str(world["sign_key"]), "--blocklist",
        str(r / "blocked.txt"), "--lora-dir", str(r / "loras"), "--embeddings-dir", str(r / "emb"),
        "--controlnet-dir", str(r / "cn"), "--allow-pickle", "--tree-ring", "--data-dir", str(tmp_path)])
    s = settings_from_args(args)
    assert (s.watermark, s.watermark_key, s.tree_ring, s.allow_pickle) == (False, "k1", True, True)
    assert s.sign_key == str(world["sign_key"]) and s.blocklists == (str(r / "blocked.txt"),)
    assert (s.lora_dir, s.embeddings_dir, s.controlnet_dir) == (r / "loras", r / "emb", r / "cn")
    defaults = settings_from_args(build_parser().parse_args(["serve", "--data-dir", str(tmp_path)]))
    assert defaults.watermark and not defaults.blocklists and defaults.sign_key is None
    with pytest.raises(EstableError, match="--lora-dir"):
        settings(tmp_path, world["model"], lora_dir=tmp_path / "missing").check()
    with pytest.raises(EstableError, match="blocklist not found"):
        create_app(settings(tmp_path, world["model"], blocklists=(tmp_path / "missing.txt",)))


def test_webuiapi_client_unchanged(server, world):
    """The `webuiapi` package (written for A1111 and its ControlNet extension) drives these features unchanged."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="euler", steps=STEPS)
    assert api.controlnet_model_list() == ["cn_edges"] and "canny" in api.controlnet_module_list()
    assert [x["name"] for x in api.get_loras()] == ["style"] and "shinyred" in api.get_embeddings()["loaded"]
    unit = webuiapi.ControlNetUnit(image=world["control_image"], module="none", model="cn_edges", weight=0.8,
                                   guidance_end=0.75)
    # a fresh alwayson_scripts: webuiapi writes the units into its (shared, mutable) default dict otherwise, and every
    # later call in this process would send them again
    r = api.txt2img(prompt="a cat", seed=SEED, cfg_scale=CFG, width=TINY, height=TINY, controlnet_units=[unit],
                    alwayson_scripts={})
    cu = ControlUnit(net=world["net"], image=world["control_image"], scale=0.8, end=0.75)
    got = np.asarray(r.image.convert("RGB")).astype(int)
    assert np.abs(got - _library(world, "a cat", control=[cu])).max() <= 1


# ------------------------------------------------------------------------------------------------ hires fix


def test_hires_fix_over_both_apis(server, world):
    """A1111's enable_hr / hr_scale / hr_upscaler / denoising_strength run the library's hires fix; /v1/jobs takes
    the same as hires_*; an unknown upscaler is a 400 and a second pass past the size limit a 422."""
    hr = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6}
    out = _txt2img(server, prompt="a cat", **hr)
    got, infotext, _ = _png(out["images"][0])
    assert got.size == (2 * TINY, 2 * TINY) and "Hires upscale: 2" in infotext
    assert json.loads(out["info"])["denoising_strength"] == 0.6
    expected = _library(world, "a cat", hires_scale=2.0, hires_strength=0.6)
    got = np.asarray(got).astype(int)
    assert np.abs(got - expected).mean() < 2  # the watermark aside, the library's image
    other = _library(world, "a cat", hires_scale=2.0, hires_strength=0.6, hires_upscaler="pixel")
    assert np.abs(got - other).mean() > 3 * np.abs(got - expected).mean()
    job = server.client.post("/v1/jobs", json={
        "prompt": "a cat", "steps": STEPS, "seed": SEED, "cfg_scale": CFG, "sampler": "euler", "width": TINY,
        "height": TINY, "hires_scale": 2, "hires_strength": 0.6}).json()
    job = _wait_job(server, job["id"])
    assert job["state"] == "done", job
    assert np.array_equal(np.asarray(_png(server.client.get(job["images"][0]["url"]).content)[0]).astype(int), got)

    r = server.client.post("/sdapi/v1/txt2img", json={**BASE, **hr, "hr_upscaler": "R-ESRGAN 4x+"})
    assert r.status_code == 400 and "Upscaler not found" in r.text
    r = server.client.post("/sdapi/v1/txt2img", json={**BASE, **hr, "width": 128, "height": 128, "hr_scale": 4})
    assert r.status_code == 422 and "hr_scale" in r.text
