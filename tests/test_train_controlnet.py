"""`estable train controlnet` on a tiny base model: only the ControlNet trains (zero convolutions start at zero, so
step 0 is the base model), the loss is finite, resume is exact, and the exported file drives the pipeline."""

from __future__ import annotations

import argparse
import json
import math
import textwrap

import pytest
import torch

from estable.checkpoints.controlnet_format import load_controlnet
from estable.checkpoints.io import sha256_file
from estable.checkpoints.store import load_model
from estable.cli_train import add_train_commands
from estable.errors import EstableError
from estable.training.config import ControlNetTrainConfig, load_config
from estable.training.controlnet_trainer import ControlNetTrainer
from estable.training.runs import load_checkpoint
from test_resume import _assert_same_file, _assert_same_state
from test_train_lora import make_base
from torchrun import run_workers

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("cn_base") / "base.safetensors")


def test_config_and_errors(base, tmp_path):
    cfg = load_config("controlnet", "tiny-controlnet", [f"base={base}", "control=seg", "hint_channels=[8,16,32]"])
    assert isinstance(cfg, ControlNetTrainConfig) and cfg.hint_channels == (8, 16, 32)
    assert ControlNetTrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad, words in (("control=depth", "control must be"), ("control_low=300", "control_low"),
                       ("caption_dropout=2", "caption_dropout"), ("init_from=x", "init_from"),
                       ("save_precision=int8", "save_precision")):
        with pytest.raises(EstableError, match=words):
            load_config("controlnet", "tiny-controlnet", [f"base={base}", bad])
    with pytest.raises(EstableError, match="base=PATH"):
        ControlNetTrainer(load_config("controlnet", "tiny-controlnet", QUIET), tmp_path / "r")
    with pytest.raises(EstableError, match="hint_channels needs 3"):
        ControlNetTrainer(load_config("controlnet", "tiny-controlnet", [*QUIET, f"base={base}",
                                                                        "hint_channels=[8,16]"]), tmp_path / "r2")


def test_train_steps_export_and_generate(base, tmp_path):
    before = sha256_file(base)
    run = tmp_path / "run"
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "controlnet", "--config", "tiny-controlnet", "--run-dir", str(run),
                              "--no-progress", f"base={base}", "max_steps=4", "log_every=2", "val_every=2",
                              "sample_every=4", "save_every=4", "tensorboard=false", "optim.lr=1e-3",
                              "save_precision=fp16"])
    assert args.func(args) == 0
    assert sha256_file(base) == before
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert (run / "samples" / "step_0000004.png").is_file()
    ck = load_checkpoint(run / "checkpoints" / "step_0000004")
    assert ck.state["kind"] == "controlnet"
    assert all(k.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block", "controlnet_"))
               for k in ck.tensors["model"])  # the ControlNet only, not the frozen base
    # the exported file is the checkpoint's ControlNet, and the zero convolutions moved off zero
    loaded = load_controlnet(run / "controlnet.safetensors", base=load_model(base).config.unet)
    sd = loaded.model.state_dict()
    assert all(torch.equal(sd[k], v.half()) for k, v in ck.tensors["model"].items())  # save_precision=fp16
    assert sd["controlnet_mid_block.weight"].abs().max() > 0
    # and the pipeline accepts it
    from PIL import Image

    from estable import GenerationParams
    from estable.control import ControlUnit
    from estable.control.preprocess import canny
    from estable.pipeline import Pipeline
    from estable.training.shapes import ShapesWorld

    pipe = Pipeline(load_model(base))
    edges = canny(ShapesWorld(seed=0, size=32).sample(0)[0])
    params = GenerationParams(prompt="a red circle", steps=3, seed=1, width=32, height=32, sampler="euler")
    with pytest.raises(EstableError, match="holds float16 weights"):  # fp16 file into an fp32 pipeline
        pipe.txt2img(params, control=[ControlUnit(net=loaded.model, image=edges)])
    loaded.model.float()
    out = pipe.txt2img(params, control=[ControlUnit(net=loaded.model, image=edges)])
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32)


def test_starts_as_the_base_model_and_trains_only_the_controlnet(base, tmp_path):
    cfg = load_config("controlnet", "tiny-controlnet", [*QUIET, f"base={base}", "max_steps=1"])
    tr = ControlNetTrainer(cfg, tmp_path / "r", progress=False)
    trainable = {n for n, p in tr.objective.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    item = tr.val_items[0]
    assert item["control"].shape == item["pixel_values"].shape
    assert 0 <= item["control"].min() < item["control"].max() <= 1
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 800])
    ctx = torch.randn(2, 32, 32, generator=g)
    control = torch.stack([item["control"]] * 2)
    with torch.no_grad():
        down, mid = tr.network(x, t, ctx, control)
        assert torch.equal(tr.unet(x, t, ctx, down, mid), tr.unet(x, t, ctx))  # zero convolutions: no effect yet


@pytest.mark.heavy
def test_controlnet_learns_to_read_its_control(tmp_path):
    """On the built-in model: at the start of training the hint encoder's features (before its zero convolution)
    tell thin edges from a blank image, and after a few steps the loss with each image's own control is below the
    loss with another image's. With PyTorch's default initialisation of the hint encoder the features of edges and
    of a blank image differed by under 0.1 %, and a 4,000-step shapes ControlNet never learned to read its control
    (its own-vs-other loss stayed equal to eight digits)."""
    from estable.pipeline import DEFAULT_MODEL_PATH
    from estable.training.builders import collate

    cfg = load_config("controlnet", "tiny-controlnet", [*QUIET, f"base={DEFAULT_MODEL_PATH}", "caption_dropout=0",
                                                        "data.size=256", "hint_channels=null"])
    tr = ControlNetTrainer(cfg, tmp_path / "r", progress=False)
    hint = tr.network.controlnet_cond_embedding
    batch = tr.prepare(collate([tr.train_data[i] for i in range(4)]))
    edges = batch["control"]
    assert 0 < edges.mean() < 0.05  # thin edges on black

    def features(image):
        x = torch.nn.functional.silu(hint.conv_in(image))
        for block in hint.blocks:
            x = torch.nn.functional.silu(block(x))
        return x

    with torch.no_grad():
        f_edges, f_blank = features(edges), features(torch.zeros_like(edges))
    assert torch.equal(f_blank, torch.zeros_like(f_blank))  # a blank control embeds to nothing
    assert f_edges.abs().mean() > 0.1 * edges.mean()  # the edges survive the strided convolutions

    obj, g = tr.objective, torch.Generator().manual_seed(0)
    rolled = {**batch, "control": edges.roll(1, 0)}

    def high_noise(d):  # where the control matters: the image is not yet in the latents
        d["t"] = torch.randint(500, 1000, (4,), generator=g)
        return d

    fixed = [high_noise(obj.draw(4, torch.Generator().manual_seed(10 + i))) for i in range(3)]
    opt = torch.optim.AdamW(tr.network.parameters(), lr=5e-4, weight_decay=0)
    for _ in range(40):
        loss, _ = obj(batch, high_noise(obj.draw(4, g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        own = sum(obj(batch, d)[0].item() for d in fixed)
        other = sum(obj(rolled, d)[0].item() for d in fixed)
    assert own < 0.8 * other, (own, other)


def test_resume_is_exact(base, tmp_path):
    over = ["log_every=1", "val_every=2", "sample_every=0", "save_every=2", "tensorboard=false", f"base={base}",
            "caption_dropout=0.5", "offset_noise=0.1", "ema_decay=0.9", "grad_accum=2", "batch_size=2", "max_steps=4",
            "optim.lr=1e-3"]
    cfg = load_config("controlnet", "tiny-controlnet", over)
    ControlNetTrainer(cfg, tmp_path / "full", progress=False).train()
    ControlNetTrainer(cfg, tmp_path / "split", progress=False).train(until=2)
    resumed = ControlNetTrainer(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    _assert_same_state(tmp_path / "full/checkpoints/step_0000004", tmp_path / "split/checkpoints/step_0000004")
    _assert_same_file(tmp_path / "full/controlnet.safetensors", tmp_path / "split/controlnet.safetensors")
    first = load_checkpoint(tmp_path / "full/checkpoints/step_0000002").tensors["model"]
    last = load_checkpoint(tmp_path / "full/checkpoints/step_0000004").tensors["model"]
    assert any(not torch.equal(first[k], last[k]) for k in first)


WORKER = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from estable.training import distributed as D
    from estable.training.config import load_config
    from estable.training.controlnet_trainer import ControlNetTrainer
    cfg = load_config("controlnet", "tiny-controlnet", json.loads(sys.argv[2]))
    trainer = ControlNetTrainer(cfg, sys.argv[1], progress=False)
    assert trainer.dist.world_size == 2, trainer.dist
    trainer.train()
    trainer.close()
    D.cleanup()
    open(os.path.join(os.path.dirname(sys.argv[1]), "ok-rank" + os.environ["RANK"]), "w").close()
""")


def test_torchrun_two_processes_match_one_with_double_batch(base, tmp_path):
    """As tests/test_ddp.py for the U-Net: AdamW with eps 1e-3 so that summation-order differences stay tiny."""
    over = ["log_every=1", "val_every=0", "sample_every=0", "save_every=2", "tensorboard=false", "max_steps=2",
            f"base={base}", "caption_dropout=0.5", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-3"]
    run_workers(tmp_path, WORKER, str(tmp_path / "ddp"), json.dumps([*over, "batch_size=2", "device=cpu"]))
    assert (tmp_path / "ok-rank0").is_file() and (tmp_path / "ok-rank1").is_file()
    ControlNetTrainer(load_config("controlnet", "tiny-controlnet", [*over, "batch_size=4"]), tmp_path / "single",
                      progress=False).train()
    a = load_checkpoint(tmp_path / "ddp/checkpoints/step_0000002").tensors["model"]
    b = load_checkpoint(tmp_path / "single/checkpoints/step_0000002").tensors["model"]
    assert max((v - b[k]).abs().max().item() for k, v in a.items()) < 1e-6
    assert max(v.abs().max().item() for k, v in b.items() if k.startswith("controlnet_down_blocks")) > 1e-4


def test_other_control_types_and_streams(base, tmp_path):
    """control=seg trains (flat palette maps), and a stream dataset gets its control images too."""
    from estable.training.controlnet_trainer import WithControlStream, control_maker

    cfg = load_config("controlnet", "tiny-controlnet", [*QUIET, f"base={base}", "max_steps=1", "control=seg"])
    tr = ControlNetTrainer(cfg, tmp_path / "seg", progress=False)
    tr.train()
    control = tr.val_items[0]["control"]
    assert len({tuple(v) for v in control.reshape(3, -1).T.tolist()}) <= 9  # palette colours only

    class Stream(torch.utils.data.IterableDataset):
        epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self):
            for item in tr.val_items[:2]:
                yield {"pixel_values": item["pixel_values"], "text": item["text"]}

    stream = WithControlStream(Stream(), control_maker(cfg))
    stream.set_epoch(3)
    items = list(stream)
    assert Stream.epochs == [3] and len(items) == 2
    assert torch.equal(items[0]["control"], tr.val_items[0]["control"])
