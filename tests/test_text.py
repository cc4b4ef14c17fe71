"""Parity of estable's CLIP text encoder with transformers' CLIPTextModel / CLIPTextModelWithProjection.

transformers is the oracle here only (the library never imports it). Both models get the same seeded random
weights through ``load_state_dict(strict=True)``; the oracle runs its eager (explicit softmax) attention.
"""

from __future__ import annotations

import pytest
import torch

from estable.config import TextConfig, preset
from estable.models.text import TextEncoder, TextEncoderOutput

transformers = pytest.importorskip("transformers")

CLIP_BOS, CLIP_EOS = 49406, 49407
TOL = 1e-5

CONFIGS = {
    # CLIP's vocabulary and 77 positions, quick-GELU, no projection (SD 1.x shape, shrunk)
    "quick_gelu_noproj": TextConfig(width=64, layers=3, heads=4, mlp_width=128, activation="quick_gelu"),
    # GELU with a projection (SD 2.x / open_clip shape, shrunk), fewer positions
    "gelu_proj": TextConfig(
        max_positions=32, width=48, layers=2, heads=3, mlp_width=96, activation="gelu", projection_dim=24
    ),
    # small vocabulary whose last id is EOS (as in CLIP), other eps, projection wider than the width
    "small_vocab": TextConfig(
        vocab_size=1000,
        max_positions=20,
        width=32,
        layers=4,
        heads=2,
        mlp_width=80,
        activation="gelu",
        layer_norm_eps=1e-6,
        projection_dim=40,
        eos_token_id=999,
    ),
    # transformers' legacy eos_token_id = 2 (configs older than its PR #24773): pooling at argmax(ids)
    "legacy_eos2": TextConfig(
        vocab_size=1000, max_positions=16, width=32, layers=2, heads=4, mlp_width=64, eos_token_id=2
    ),
}


def to_hf_config(cfg: TextConfig):
    """The transformers CLIPTextConfig equivalent to an estable TextConfig."""
    eos = cfg.eos_token_id
    bos = CLIP_BOS if cfg.vocab_size > CLIP_BOS else cfg.vocab_size - 2
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim if cfg.projection_dim is not None else 512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=1,
        attn_implementation="eager",
    )


def hf_model_class(cfg: TextConfig):
    return transformers.CLIPTextModelWithProjection if cfg.projection_dim is not None else transformers.CLIPTextModel


def disk_state_dict(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's state_dict with the key names its model.safetensors files carry.

    transformers ≥ 5 strips the ``text_model.`` prefix of CLIPTextModel in memory (and adds it back when it
    saves a model it loaded); older versions and every published file keep it.
    """
    out = {}
    for k, v in ref.state_dict().items():
        if not (k.startswith("text_model.") or k.startswith("text_projection.")):
            k = "text_model." + k
        out[k] = v
    return out


def reference_text_model(ref: torch.nn.Module) -> torch.nn.Module:
    """The CLIPTextModel inside a reference (itself, or .text_model of the with-projection class)."""
    return ref.text_model if hasattr(ref, "text_projection") else ref


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise, LayerNorm gains around 1 and biases nonzero, so that
    no weight is a trivial value that could hide a mix-up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.ndim == 2 and "embedding" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)  # Linear weight (out, in): unit-variance outputs
            elif p.ndim == 2:
                p.copy_(0.5 * noise)  # embeddings
            else:
                p.copy_(0.1 * noise)  # Linear biases


def build_pair(cfg: TextConfig, seed: int = 0) -> tuple[TextEncoder, torch.nn.Module]:
    ref = hf_model_class(cfg)(to_hf_config(cfg)).eval()
    randomize_(ref, seed)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(disk_state_dict(ref), strict=True)
    return ours, ref


def make_ids(cfg: TextConfig, lengths: tuple[int, ...], total: int, pad: int, seed: int = 1) -> torch.Tensor:
    """Tokenizer-like rows: BOS, ``n`` ordinary tokens, EOS, then ``pad`` up to ``total``. (B, total)"""
    g = torch.Generator().manual_seed(seed)
    big = cfg.vocab_size > CLIP_EOS
    bos, eos = (CLIP_BOS, CLIP_EOS) if big else (cfg.vocab_size - 2, cfg.vocab_size - 1)
    if cfg.eos_token_id != 2:
        assert eos == cfg.eos_token_id
    rows = []
    for n in lengths:
        words = torch.randint(3, bos, (n,), generator=g)  # never BOS/EOS, never the legacy id 2
        row = torch.cat([torch.tensor([bos]), words, torch.tensor([eos]), torch.full((total - n - 2,), pad)])
        rows.append(row)
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def id_cases(cfg: TextConfig) -> list[tuple[str, torch.Tensor]]:
    eos = CLIP_EOS if cfg.vocab_size > CLIP_EOS else cfg.vocab_size - 1
    t = cfg.max_positions
    lengths = (3, t - 6)  # batch 2 with different lengths
    return [
        ("sd1_eos_padding", make_ids(cfg, lengths, t, pad=eos)),
        ("sd2_zero_padding", make_ids(cfg, lengths, t, pad=0)),
        ("shorter_than_max_positions", make_ids(cfg, (2, t - 9), t - 4, pad=0, seed=2)),
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name: str) -> None:
    cfg = CONFIGS[name]
    ours, ref = build_pair(cfg, seed=list(CONFIGS).index(name))
    ref_text = reference_text_model(ref)
    for case, ids in id_cases(cfg):
        with torch.no_grad():
            r = ref(ids, output_hidden_states=True)
            r_text = ref_text(ids, output_hidden_states=True)  # pooler_output lives on the inner model
            o1 = ours(ids, clip_skip=1)
            o2 = ours(ids, clip_skip=2)
            penultimate = ref_text.final_layer_norm(r.hidden_states[-2])
        assert len(r.hidden_states) == cfg.layers + 1
        assert isinstance(o1, TextEncoderOutput)
        errs = {
            "context@1": rel_err(o1.context, r.last_hidden_state),
            "last_hidden_state": rel_err(o1.last_hidden_state, r.last_hidden_state),
            "context@2": rel_err(o2.context, penultimate),
            "last_hidden_state@2": rel_err(o2.last_hidden_state, r.last_hidden_state),
            "pooled": rel_err(o1.pooled, r_text.pooler_output),
        }
        if cfg.projection_dim is not None:
            assert o1.text_embeds is not None and o1.text_embeds.shape == (ids.shape[0], cfg.projection_dim)
            errs["text_embeds"] = rel_err(o1.text_embeds, r.text_embeds)
        else:
            assert o1.text_embeds is None
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        assert not bad, f"{name}/{case}: {bad}"
        # the clip-skip-2 context really is a different layer's output
        assert rel_err(o2.context, o1.context) > 1e-2


def test_pooled_reads_first_eos_of_each_row() -> None:
    cfg = CONFIGS["quick_gelu_noproj"]
    ours, _ = build_pair(cfg)
    ids = make_ids(cfg, (3, 10), cfg.max_positions, pad=CLIP_EOS)  # first EOS at 4 and 11
    with torch.no_grad():
        out = ours(ids)
    torch.testing.assert_close(out.pooled[0], out.last_hidden_state[0, 4], rtol=0, atol=0)
    torch.testing.assert_close(out.pooled[1], out.last_hidden_state[1, 11], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["quick_gelu_noproj", "small_vocab"])
def test_encode_equals_forward_context(name: str) -> None:
    cfg = CONFIGS[name]
    ours, _ = build_pair(cfg)
    ids = id_cases(cfg)[0][1]
    with torch.no_grad():
        for skip in range(1, cfg.layers + 1):
            torch.testing.assert_close(ours.encode(ids, skip), ours(ids, clip_skip=skip).context, rtol=0, atol=0)


def test_encode_runs_only_needed_blocks() -> None:
    cfg = CONFIGS["small_vocab"]
    ours = TextEncoder(cfg).eval()
    calls: list[int] = []
    for i, block in enumerate(ours.text_model.encoder.layers):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    ids = id_cases(cfg)[0][1]
    with torch.no_grad():
        ours.encode(ids, clip_skip=2)
        assert calls == [0, 1, 2]
        calls.clear()
        ours(ids, clip_skip=2)  # forward needs the last block too (last_hidden_state, pooled)
        assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["quick_gelu_noproj", "gelu_proj"])
def test_state_dict_keys_and_shapes_equal_transformers(name: str) -> None:
    cfg = CONFIGS[name]
    ref = hf_model_class(cfg)(to_hf_config(cfg))
    theirs = {k: tuple(v.shape) for k, v in disk_state_dict(ref).items()}
    ours = {k: tuple(v.shape) for k, v in TextEncoder(cfg).state_dict().items()}
    assert ours == theirs
    assert not any("position_ids" in k for k in ours)
    assert ("text_projection.weight" in ours) == (cfg.projection_dim is not None)


def test_meta_construction_and_assign_load() -> None:
    cfg = CONFIGS["gelu_proj"]
    eager, ref = build_pair(cfg)
    with torch.device("meta"):
        lazy = TextEncoder(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.load_state_dict(disk_state_dict(ref), strict=True, assign=True)
    lazy.eval()
    assert not any(p.is_meta for p in lazy.parameters()) and not any(b.is_meta for b in lazy.buffers())
    ids = id_cases(cfg)[1][1]
    with torch.no_grad():
        a, b = lazy(ids, clip_skip=2), eager(ids, clip_skip=2)
    torch.testing.assert_close(a.context, b.context, rtol=0, atol=0)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=0)


def test_strict_load_rejects_missing_and_unexpected_keys() -> None:
    cfg = CONFIGS["gelu_proj"]
    _, ref = build_pair(cfg)
    sd = disk_state_dict(ref)
    missing = {k: v for k, v in sd.items() if k != "text_projection.weight"}
    with pytest.raises(RuntimeError, match="text_projection"):
        TextEncoder(cfg).load_state_dict(missing, strict=True)
    with pytest.raises(RuntimeError, match="position_ids"):
        TextEncoder(cfg).load_state_dict({**sd, "text_model.embeddings.position_ids": torch.arange(32)}, strict=True)


def test_gradient_checkpointing_gives_identical_outputs_and_grads() -> None:
    cfg = CONFIGS["gelu_proj"]
    plain, _ = build_pair(cfg)
    ckpt, _ = build_pair(cfg)
    ckpt.gradient_checkpointing = True
    ids = id_cases(cfg)[0][1]
    results = []
    for model in (plain, ckpt):
        model.train()
        out = model(ids, clip_skip=2)
        loss = out.context.square().mean() + out.text_embeds.sin().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.context.detach(), out.text_embeds.detach(), grads))
    (c0, e0, g0), (c1, e1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=0, atol=0)
    torch.testing.assert_close(e1, e0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)


def test_gradient_checkpointing_is_used_only_in_training() -> None:
    cfg = CONFIGS["quick_gelu_noproj"]
    model = TextEncoder(cfg)
    model.gradient_checkpointing = True
    ids = id_cases(cfg)[0][1]
    seen: list[bool] = []
    # hook the block's first op: non-reentrant recomputation stops early, before the block's own forward returns
    model.text_model.encoder.layers[0].layer_norm1.register_forward_hook(lambda *_: seen.append(True))
    model.train()
    model(ids).context.sum().backward()
    assert len(seen) == 2  # forward, then recomputation in backward
    seen.clear()
    model.eval()
    model(ids)
    assert len(seen) == 1


def test_bad_inputs_have_actionable_messages() -> None:
    cfg = CONFIGS["small_vocab"]
    model = TextEncoder(cfg)
    ids = id_cases(cfg)[0][1]
    with pytest.raises(ValueError, match="clip_skip"):
        model(ids, clip_skip=0)
    with pytest.raises(ValueError, match="clip_skip"):
        model.encode(ids, clip_skip=cfg.layers + 1)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, cfg.max_positions + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(ids[0])
    with pytest.raises(ValueError, match="integer"):
        model(ids.float())


@pytest.mark.parametrize("name, expected_millions", [("sd15", 123.06), ("sd21-base", 354.03)])
def test_full_size_parameter_count_equals_transformers(name: str, expected_millions: float) -> None:
    cfg = preset(name).text
    with torch.device("meta"):
        ours = TextEncoder(cfg)
        ref = hf_model_class(cfg)(to_hf_config(cfg))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref
    assert round(n_ours / 1e6, 2) == expected_millions
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in disk_state_dict(ref).items()}
