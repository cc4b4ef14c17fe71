"""Training-speed options of the trainers: channels_last, fused AdamW switch, compile of the whole network or of
its blocks. Each must train the same numbers as the plain eager run (losses of the first steps, CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from estable.errors import EstableError
from estable.nn.attention import GEGLU, split_geglu
from estable.training.config import load_config
from estable.training.unet_trainer import UNetTrainer
from graph_util import traced_backward

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "max_steps=3",
         "device=cpu", "batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-3"]


def _losses(tmp_path, name: str, *over: str) -> list[float]:
    cfg = load_config("unet", "tiny-unet", [*QUIET, *over])
    trainer = UNetTrainer(cfg, tmp_path / name, progress=False)
    trainer.train()
    return [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("type") == "train"]


def test_options_validate():
    with pytest.raises(EstableError, match="compile_scope"):
        load_config("unet", "tiny-unet", ["compile_scope=region"])
    with pytest.raises(EstableError, match="compile_mode"):
        load_config("unet", "tiny-unet", ["compile_mode=max-autotune"])
    with pytest.raises(EstableError, match="needs compile_scope=whole"):
        load_config("unet", "tiny-unet", ["compile_mode=reduce-overhead", "compile_scope=blocks"])
    cfg = load_config("unet", "tiny-unet", ["channels_last=true", "optim.fused=false", "compile_scope=blocks"])
    assert cfg.channels_last and not cfg.optim.fused and cfg.compile_scope == "blocks"


def test_channels_last_trains_the_same_numbers(tmp_path):
    eager = _losses(tmp_path, "eager")
    cl = _losses(tmp_path, "cl", "channels_last=true")
    assert len(eager) == 3 and len(set(eager)) == 3  # three distinct steps were logged
    assert max(abs(a - b) for a, b in zip(eager, cl)) < 1e-5 * max(map(abs, eager))
    t = UNetTrainer(load_config("unet", "tiny-unet", [*QUIET, "channels_last=true"]), tmp_path / "x", progress=False)
    assert t.network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.heavy
@pytest.mark.parametrize("scope, layout", [("blocks", "false"), ("whole", "true")])
def test_compiled_step_gives_the_eager_losses(tmp_path, monkeypatch, scope, layout):
    """Compiled block by block, and compiled whole with channels_last (its convolutions pinned: nn/layout.py), the
    step trains the eager numbers. (Whole without channels_last, a third Inductor compile of 1.5 minutes on the CI's
    2 cores, differs from the second only by the layout, which test_channels_last_trains_the_same_numbers covers.)"""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = _losses(tmp_path, "eager")
    compiled = _losses(tmp_path, "compiled", "compile=true", f"compile_scope={scope}", f"channels_last={layout}")
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4 * max(map(abs, eager))


def test_vae_compile_compiles_the_encoder_and_decoder(tmp_path):
    """The VAE objective calls encode() and decode(): compiling the whole module's forward would compile nothing."""
    from estable.training.vae_trainer import VAETrainer

    cfg = load_config("vae", "tiny-vae", ["device=cpu", "compile=true", "tensorboard=false"])
    trainer = VAETrainer(cfg, tmp_path / "vae", progress=False)
    assert trainer.objective.vae is trainer.network
    for part in (trainer.network.encoder, trainer.network.decoder):
        assert part._compiled_call_impl is not None


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """compile_mode=reduce-overhead (CUDA graphs, which only a GPU replays) is handed to torch.compile."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(kw) or module)
    cfg = load_config("unet", "tiny-unet", [*QUIET, "compile=true", "compile_mode=reduce-overhead"])
    trainer = UNetTrainer(cfg, tmp_path / "ro", progress=False)
    assert seen == [{"mode": "reduce-overhead"}]
    geglus = [m for m in trainer.network.modules() if isinstance(m, GEGLU)]
    assert geglus and all(m.split for m in geglus)  # compiled whole, GEGLU's backward concatenates nothing


def test_split_geglu_keeps_the_numbers_and_drops_the_activation_concatenation():
    """split_geglu: GEGLU as two matrix products over halves of its weight gives the same outputs and
    gradients, keeps the state dict, and its traced backward concatenates nothing — GEGLU's own concatenates the
    (tokens × 2·inner) activation gradient."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    weights = torch.randn(2, 6, 16)

    def run(m):
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out * weights).sum().backward()
        return out, [xi.grad, m.proj.weight.grad.clone(), m.proj.bias.grad.clone()]

    def concatenated(m) -> list[tuple[int, ...]]:
        graph = traced_backward(m, lambda y: (y * weights).sum(), x.clone().requires_grad_())
        return sorted(tuple(n.meta["val"].shape) for n in graph.graph.nodes if n.target is torch.ops.aten.cat.default)

    geglu = GEGLU(8, 16)
    ref, ref_grads = run(geglu)
    assert (2, 6, 32) in concatenated(geglu)  # the activation gradient GEGLU's backward concatenates
    keys = list(geglu.state_dict())
    geglu.proj.weight.grad = geglu.proj.bias.grad = None
    assert split_geglu(geglu) == 1
    out, grads = run(geglu)
    assert torch.allclose(out, ref, atol=1e-6) and list(geglu.state_dict()) == keys
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
    geglu.proj.weight.grad = geglu.proj.bias.grad = None
    assert concatenated(geglu) == []  # the halves' weight gradients are scattered into the weight's, not concatenated
    from estable.nn.lora import inject_lora

    adapted = GEGLU(8, 16)
    inject_lora(adapted, rank=2, alpha=2.0, targets=("proj",))
    assert split_geglu(adapted) == 0 and not adapted.split  # a LoRA projection adds its term in its own forward


def _conv_backward_layouts(model, x, t, c) -> dict[tuple[str, bool], int]:
    """Trace ``model``'s training step on the CPU (bf16 autocast) and count, in its backward graph, the
    convolution backwards whose output gradient / input arrive in channels_last memory (True) or not (False)."""
    graph = traced_backward(model, lambda y: y.float().square().mean(), x, t, c, autocast=True)
    counts: dict[tuple[str, bool], int] = {}
    for n in graph.graph.nodes:
        if n.target is torch.ops.aten.convolution_backward.default:
            for i, role in ((0, "grad_output"), (1, "input")):
                v = n.args[i].meta["val"]
                ok = v.is_contiguous(memory_format=torch.channels_last) or v.shape[-2:] == (1, 1)
                counts[(role, ok)] = counts.get((role, ok), 0) + 1
    return counts


def test_pinned_convolutions_keep_their_numbers_and_layouts():
    """nn.layout.pin_channels_last: a pinned convolution gives the same outputs and gradients, keeps its state-dict
    keys, and in the compiled training step's backward graph (traced on the CPU) leaves no convolution backward a
    tensor outside channels_last memory — without the pins, cat's backward hands several a slice."""
    from estable.config import UNetConfig
    from estable.models.unet import UNet
    from estable.nn.layout import pin_channels_last

    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 4, 3, generator=gen).requires_grad_()
    weights = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).view(2, 5, 4, 3)
    ref = conv(x)
    (ref * weights).sum().backward()
    grads = [x.grad.clone(), conv.weight.grad.clone()]
    x.grad = conv.weight.grad = None
    assert pin_channels_last(conv) == 1 and pin_channels_last(conv) == 0  # pinned once
    out = conv(x)
    assert torch.allclose(out, ref, atol=1e-6) and out.is_contiguous(memory_format=torch.channels_last)
    (out * weights).sum().backward()
    assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip([x.grad, conv.weight.grad], grads))
    assert list(conv.state_dict()) == ["weight", "bias"]

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, False), num_heads=2,
                           context_dim=16, norm_groups=8, sample_size=8)).train().to(memory_format=torch.channels_last)
    keys = list(unet.state_dict())
    args = (torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([10, 500]),
            torch.randn(2, 5, 16))
    plain = _conv_backward_layouts(unet, *args)
    convs = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert plain.get(("grad_output", False), 0) > 0, plain  # the case the pins are for
    assert pin_channels_last(unet) == convs and list(unet.state_dict()) == keys
    pinned = _conv_backward_layouts(unet, *args)
    assert pinned == {("grad_output", True): convs, ("input", True): convs}, pinned


def test_channels_last_pins_the_trainers_convolutions(tmp_path):
    cfg = load_config("unet", "tiny-unet", [*QUIET, "channels_last=true"])
    t = UNetTrainer(cfg, tmp_path / "cl", progress=False)
    convs = [m for m in t.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m._forward_hooks and m._forward_pre_hooks for m in convs)
    plain = UNetTrainer(load_config("unet", "tiny-unet", QUIET), tmp_path / "plain", progress=False)
    assert not any(m._forward_hooks for m in plain.network.modules() if isinstance(m, torch.nn.Conv2d))
