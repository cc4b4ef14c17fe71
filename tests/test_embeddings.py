"""Textual-inversion embeddings: the A1111, kohya and diffusers file formats, use by name in prompts and negative
prompts, TI hashes, and pixel parity with diffusers' ``load_textual_inversion`` on a tiny random SD pipeline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from estable.checkpoints.io import write_safetensors
from estable.embeddings import EmbeddingLibrary, load_embedding, save_embedding, ti_hashes_text
from estable.errors import CheckpointError, EstableError
from estable.nn.cuda_graph import GraphedEncoder
from estable.provenance.infotext import parse_infotext

diffusers = pytest.importorskip("diffusers")
from estable import load_pipeline  # noqa: E402
from test_cuda_graph import _CpuGraphs  # noqa: E402
from test_extra_networks import CFG, SEED, SIZE, STEPS, _params, _pixels, make_tiny_sd  # noqa: E402

WIDTH = 32  # the tiny text encoder's width


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("ti_sd"))


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder, device="cpu", dtype="fp32")


def _a1111_pt(path: Path, vec: torch.Tensor) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "whatever", "step": 99,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


def test_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    v3 = torch.randn(3, WIDTH, generator=g)
    emb = load_embedding(_a1111_pt(tmp_path / "shiny.pt", v3), allow_pickle=True)
    assert emb.name == "shiny" and torch.equal(emb.vectors, v3)  # A1111: the file's stem, not data["name"]
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_embedding(tmp_path / "shiny.pt")
    save_embedding(tmp_path / "glow.safetensors", v3[:2])
    emb = load_embedding(tmp_path / "glow.safetensors")
    assert emb.name == "glow" and torch.equal(emb.vectors, v3[:2])
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": v3[0]})  # diffusers, one vector (d,)
    emb = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.name == "<cat-toy>" and emb.vectors.shape == (1, WIDTH)
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": v3, "clip_g": torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors")
    write_safetensors(tmp_path / "two.safetensors", {"a": v3, "b": v3})
    with pytest.raises(CheckpointError, match="not an embedding"):
        load_embedding(tmp_path / "two.safetensors")
    assert ti_hashes_text([emb]) == f"<cat-toy>: {hashlib.sha256(emb.path.read_bytes()).hexdigest()[:12]}"


@pytest.fixture(scope="module")
def embeddings_dir(ours, tmp_path_factory) -> Path:
    """Three embeddings at the scale of the token table: A1111 .pt (3 vectors), kohya .safetensors (2), diffusers
    learned_embeds.safetensors (1, token <neg-style>)."""
    root = tmp_path_factory.mktemp("embeddings")
    (root / "more").mkdir()
    g = torch.Generator().manual_seed(7)
    scale = ours.text_encoder.text_model.embeddings.token_embedding.weight.std().item()
    _a1111_pt(root / "shinyred.pt", torch.randn(3, WIDTH, generator=g) * scale * 3)
    save_embedding(root / "more" / "glowy.safetensors", torch.randn(2, WIDTH, generator=g) * scale * 3)
    write_safetensors(root / "learned_embeds.safetensors", {"<neg-style>": torch.randn(WIDTH, generator=g) * scale * 3})
    return root


PROMPT = "a shinyred cube on a blue floor, glowy"
NEGATIVE = "blurry, <neg-style>"


def _theirs(model: Path, root: Path) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(root / "shinyred.pt"), token="shinyred")
    pipe.load_textual_inversion(str(root / "more" / "glowy.safetensors"), token="glowy")
    pipe.load_textual_inversion(str(root / "learned_embeds.safetensors"))
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                   width=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images
    return (out * 255).round().astype(np.int16)


def test_textual_inversion_parity_with_diffusers(folder, ours, embeddings_dir):
    params = _params(prompt=PROMPT, negative_prompt=NEGATIVE)
    plain = _pixels(ours.txt2img(params))
    # The prompt's encoding as on a GPU (recorded graphs, here a CPU stand-in): the same pixels without embeddings;
    # with them it must not replay, since an embedding session swaps the token table under the recorded graph
    backend = _CpuGraphs()
    eager_encode, ours.text_encode = ours.text_encode, GraphedEncoder(ours.text_encoder, backend=backend)
    try:
        assert np.array_equal(_pixels(ours.txt2img(params)), plain) and len(backend.recorded) == 1
        replays = sum(g.replays for g in backend.recorded)
        ours.embeddings = EmbeddingLibrary(embeddings_dir, allow_pickle=True)
        result = ours.txt2img(params)
        assert len(backend.recorded) == 1 and sum(g.replays for g in backend.recorded) == replays
    finally:
        ours.embeddings = None
        ours.text_encode = eager_encode
    got = _pixels(result)
    ref = _theirs(folder, embeddings_dir)
    assert ref.std() > 5
    assert np.abs(ref - got).max() <= 1, f"{np.abs(ref - got).max()} levels"
    assert np.abs(plain - got).max() > 20  # the embeddings matter far more than the tolerance
    used = [e.name for e in ours.used_embeddings]
    assert used == ["shinyred", "glowy", "<neg-style>"]  # positive prompt first, then the negative one
    info = parse_infotext(result.infotexts[0])["params"]["TI hashes"]
    assert info.split(", ")[0] == "shinyred: " + hashlib.sha256(
        (embeddings_dir / "shinyred.pt").read_bytes()).hexdigest()[:12]
    assert [e["name"] for e in result.records[0]["embeddings"]] == used


def test_embedding_errors(ours, tmp_path):
    save_embedding(tmp_path / "wide.safetensors", torch.zeros(1, 768))
    ours.embeddings = EmbeddingLibrary(tmp_path)
    try:
        with pytest.raises(EstableError, match="width 768"):
            ours.txt2img(_params(prompt="a wide cube", steps=1))
        _pixels(ours.txt2img(_params(prompt="a narrow cube", steps=1)))  # unused files are never read
    finally:
        ours.embeddings = None
    with pytest.raises(EstableError, match="not a folder"):
        EmbeddingLibrary(tmp_path / "nope")
