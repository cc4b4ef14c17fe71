"""Every training config in recipes/default is a valid config of its trainer (a recipe a user copies must load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from estable.training.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "default"
KINDS = ("controlnet", "clip", "lora", "unet", "vae")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.json")), ids=lambda p: p.name)
def test_recipe_config_loads(path):
    kind = next((k for k in KINDS if path.name.startswith(k)), None)
    assert kind is not None, f"{path.name}: name it after its trainer ({', '.join(KINDS)})"
    cfg = load_config(kind, path)
    assert cfg.max_steps > 0


def test_relations_ablation_trains_in_segments_and_scores_each_scale(tmp_path):
    """recipes/default/relations_ablation.py (the grow32 stage's driver), on a tiny model: the start scored once, then
    one JSON line per segment and guidance scale; the run resumes across segments, and a grown U-Net trains."""
    import json
    import os
    import subprocess
    import sys

    from test_train_lora import make_base  # the tests folder is on the path, as for the other tests

    base = make_base(tmp_path / "base.safetensors")
    out = tmp_path / "abl.jsonl"
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "relations_ablation.py"), "--config", "tiny-unet", "--run-dir",
         str(tmp_path / "run"), "--every", "1", "--eval-start", "--cfg", "1", "--cfg", "4", "--prompts", "2",
         "--images-per-prompt", "1", "--steps", "2", "--out", str(out), f"init_from={base}", f"text.source={base}",
         f"vae.source={base}", "grow_attention=[1]", "max_steps=2", "device=cpu", "tensorboard=false",
         "sample_every=0", "val_every=0", "save_every=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["cfg"]) for r in rows] == [(0, 1.0), (0, 4.0), (1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)]
    assert all(0 <= r["by_kind"]["pair"]["whole_prompt"] <= 1 for r in rows)
    from estable.checkpoints.store import load_model

    assert load_model(tmp_path / "run" / "model.safetensors").unet.config.attention_levels == (True, True)


DRY_RUN = ["max_steps=2", "batch_size=2", "device=cpu", "precision=fp32", "data.num_workers=0", "data.size=64",
           "data.shapes_length=8", "data.val_size=2", "tensorboard=false"]
# reproduce.py's last two stages (estable train preference, estable train synonyms) take their own options
CHAIN_DRY_RUN = [*DRY_RUN, "preference.prompts=2", "preference.seeds=2", "preference.steps=2", "preference.gen_batch=4",
                 "preference.device=cpu", "synonyms.scenes=4", "synonyms.val_scenes=4", "synonyms.steps=2",
                 "synonyms.batch=2", "synonyms.device=cpu"]


def _reproduce(folder, *args):
    import os
    import subprocess
    import sys

    env = {"OMP_NUM_THREADS": "2", **os.environ, "PYTHONPATH": str(RECIPES.parents[1] / "src")}  # make test: 1
    proc = subprocess.run([sys.executable, str(RECIPES / "reproduce.py"), "--dir", str(folder), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.heavy
def test_reproduce_chain_runs_every_stage_in_order(tmp_path):
    """recipes/default/reproduce.py end to end as a CPU dry run (every stage two steps, 64² images): each stage
    starts from the one before, the decoder goes into the fifth model, the last file carries the shipped settings;
    a second call finds every stage done."""
    import json

    from estable.checkpoints.io import read_safetensors
    from estable.checkpoints.store import load_model

    out = _reproduce(tmp_path, *CHAIN_DRY_RUN)
    commands = [line[2:].split() for line in out.splitlines() if line.startswith("$ ")]
    stages = ["vae", "clip", "part1", "part2", "part3", "part4", "part5", "decoder", "part6", "fifth", "part7", "sixth",
              "part8", "seventh", "part9", "eighth", "part10", "ninth", "part11", "tenth", "part12", "eleventh",
              "decoder2", "twelfth", "decoder3", "thirteenth", "contact", "fourteenth", "contact2", "contact2_model",
              "contact3", "fifteenth", "sixteenth", "model"]
    training = {c[c.index("--run-dir") + 1].split("/")[-1]: c for c in commands if "--run-dir" in c}
    conversions = ("fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth", "thirteenth",
                   "fourteenth", "contact2_model", "fifteenth", "sixteenth", "model")
    assert list(training) == [s for s in stages if s not in conversions]
    # the last two stages: the fifteenth's U-Net by preference, then the sixteenth's text encoder taught synonyms,
    # each with the dry run's options for it, none of the trainers'
    preference = next(c for c in commands if c[1:3] == ["train", "preference"])
    assert preference[3:5] == [str(tmp_path / "fifteenth.safetensors"), str(tmp_path / "sixteenth.safetensors")]
    assert preference[preference.index("--prompts") + 1] == "2" and "--gen-batch" in preference
    assert "--scenes" not in preference
    synonyms = next(c for c in commands if c[1:3] == ["train", "synonyms"])
    assert synonyms[3:5] == [str(tmp_path / "sixteenth.safetensors"), str(tmp_path / "model.safetensors")]
    assert synonyms[synonyms.index("--scenes") + 1] == "4" and "--prompts" not in synonyms
    assert synonyms.count("--device") == 2  # the stage's own (cpu, as the shipped file was made), then the caller's
    assert not any(a.startswith(("preference.", "synonyms.")) for c in training.values() for a in c)
    ours = read_safetensors(tmp_path / "model.safetensors")[0]
    theirs = read_safetensors(tmp_path / "sixteenth.safetensors")[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("text_encoder."))
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("text_encoder."))
    part3, part7 = training["part3"], training["part7"]
    assert f"init_from={tmp_path / 'part2.safetensors'}" in part3 and "text.train=true" in part3
    assert f"init_from={tmp_path / 'fifth.safetensors'}" in part7
    assert part7[part7.index("--until") + 1] == "2"  # min(3,100, the dry run's max_steps)
    assert part7[-1] == "max_minutes=null"  # unet_mix.json's 6-minute budget is the shipped run's, not the chain's
    part8 = training["part8"]
    sixth_file = tmp_path / "sixth.safetensors"
    assert f"init_from={sixth_file}" in part8 and f"text.source={sixth_file}" in part8
    part9 = training["part9"]
    seventh_file = tmp_path / "seventh.safetensors"
    assert f"init_from={seventh_file}" in part9 and f"vae.source={seventh_file}" in part9
    seventh = load_model(seventh_file).config
    assert seventh.default_cfg == 3.5 and seventh.prompt_completion == "shapes-grey-background"
    part10 = training["part10"]
    eighth_file = tmp_path / "eighth.safetensors"
    assert f"init_from={eighth_file}" in part10 and f"text.source={eighth_file}" in part10
    assert "data.shapes_seed=61" in part10 and "data.shapes_relation_axis_ratio=2" in part10
    assert load_model(eighth_file).config.default_sampler == "dpmpp_2m"
    part11 = training["part11"]
    ninth_file = tmp_path / "ninth.safetensors"
    assert f"init_from={ninth_file}" in part11 and f"vae.source={ninth_file}" in part11
    assert "data.shapes_seed=63" in part11 and "data.shapes_relation_axis_ratio=2.5" in part11
    part12 = training["part12"]
    tenth_file = tmp_path / "tenth.safetensors"
    assert f"init_from={tenth_file}" in part12 and f"text.source={tenth_file}" in part12
    assert "data.shapes_seed=67" in part12 and "data.shapes_relation_axis_ratio=2.5" in part12
    kinds = [json.loads(a.strip("'").split("=", 1)[1]) for a in part12 if "data.shapes_kinds=" in a]
    assert kinds == [{"single": 0.1, "count": 0.5, "pair": 0.3, "colour_binding": 0.1}]
    lines = [json.loads(line) for line in (tmp_path / "times.jsonl").read_text().splitlines()]
    times = [t for t in lines if "seconds" in t]
    assert len(times) == len(commands) and all(t["status"] == 0 and t["seconds"] > 0 for t in times)
    assert [t["stage"] for t in lines if t.get("finished")] == stages
    model = load_model(tmp_path / "model.safetensors")
    assert model.config.default_cfg == 3.5 and model.config.default_sampler == "dpmpp_2m"
    assert model.config.prompt_completion == "shapes-grey-background"
    sixth = load_model(tmp_path / "sixth.safetensors").config
    assert sixth.default_cfg == 4 and sixth.prompt_completion is None
    decoder, _ = read_safetensors(tmp_path / "decoder" / "checkpoints" / "step_0000002" / "ema.safetensors")
    fifth = load_model(tmp_path / "fifth.safetensors", dtype="fp32").vae.state_dict()
    key = next(k for k in decoder if k.startswith("decoder.") and k.endswith("weight"))
    assert torch.allclose(fifth[key], decoder[key].float(), atol=1e-3)  # fp16 in the file
    assert load_model(tmp_path / "fifth.safetensors").config.default_cfg == 5
    # the eleventh's decoder with the worst-pixel term put into the twelfth, the twelfth's once more into the
    # thirteenth, the thirteenth's on touching objects into the fourteenth, and twice more from there
    for name, base, made in (("decoder2", "eleventh", "twelfth"), ("decoder3", "twelfth", "thirteenth"),
                             ("contact", "thirteenth", "fourteenth"), ("contact2", "fourteenth", "contact2_model"),
                             ("contact3", "contact2_model", "fifteenth")):
        run, base_file, made_file = training[name], tmp_path / f"{base}.safetensors", tmp_path / f"{made}.safetensors"
        assert f"init_from={base_file}" in run and "worst_weight=0.3" in run
        assert ("data.shapes_contact=0.5" in run) == name.startswith("contact")
        assert run[run.index("--until") + 1] == "2"  # min(3,000 or 3,100, the dry run's max_steps)
        ours, theirs = read_safetensors(made_file)[0], read_safetensors(base_file)[0]
        conversion = next(c for c in commands if c[1] == "convert" and c[3] == str(made_file))
        ema = tmp_path / name / "checkpoints" / "step_0000002" / "ema.safetensors"
        assert conversion[2] == str(base_file) and conversion[conversion.index("--vae") + 1] == str(ema)
        assert torch.allclose(ours[f"vae.{key}"].float(), read_safetensors(ema)[0][key].float(), atol=1e-3)
        decoder_side = ("vae.decoder.", "vae.post_quant")
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith(decoder_side))
    again = _reproduce(tmp_path, *CHAIN_DRY_RUN)
    assert "$ " not in again and again.count("done already") == len(stages)


@pytest.mark.heavy
def test_reproduce_wide_stages_run_only_by_name_from_the_shipped_text_encoder(tmp_path):
    """The wide U-Net's stages (not shipped) start after the chain's sixteenth model: wide1 from nothing on that
    file's text encoder and VAE, each later one from the one before; named, they run alone, and the last file
    carries the shipped settings and the sixteenth's text encoder."""
    import shutil

    from estable.checkpoints.io import read_safetensors
    from estable.checkpoints.store import load_model
    from estable.pipeline import default_model_path

    chain_model = tmp_path / "sixteenth.safetensors"  # stands for the chain's stage
    shutil.copy(default_model_path(), chain_model)
    out = _reproduce(tmp_path, "wide1", "wide2", "wide3", "wide", *DRY_RUN, "model.sample_size=8", "compile=false")
    commands = [line[2:].split() for line in out.splitlines() if line.startswith("$ ")]
    training = {c[c.index("--run-dir") + 1].split("/")[-1]: c for c in commands if "--run-dir" in c}
    assert list(training) == ["wide1", "wide2", "wide3"]
    wide1, wide2, wide3 = training["wide1"], training["wide2"], training["wide3"]
    assert f"text.source={chain_model}" in wide1 and f"vae.source={chain_model}" in wide1
    assert not any(a.startswith("init_from=") for a in wide1)
    assert f"init_from={tmp_path / 'wide1.safetensors'}" in wide2 and "optim.lr=2e-4" in wide2
    assert f"init_from={tmp_path / 'wide2.safetensors'}" in wide3
    assert wide3[wide3.index("--until") + 1] == "2"  # min(10,700, the dry run's max_steps)
    wide = load_model(tmp_path / "wide.safetensors")
    assert wide.config.default_cfg == 3.5 and wide.config.prompt_completion == "shapes-grey-background"
    assert wide.unet.config.block_channels == (56, 112, 168)
    ours, theirs = read_safetensors(tmp_path / "wide.safetensors")[0], read_safetensors(chain_model)[0]
    text = [k for k in theirs if k.startswith("text_encoder.")]
    assert text and all(torch.equal(ours[k], theirs[k]) for k in text)
    assert f"{tmp_path / 'wide.safetensors'}: sha256" in out


def stage_folder(tmp_path: Path, **env: str) -> dict:
    """A folder where recipes/default/train_gpu.sh runs as on a lent machine (src, recipes and benchmarks linked in),
    and the environment for a CPU dry run of a stage: this Python first on PATH, tiny evaluations, ``env`` added."""
    import os
    import sys

    repo = RECIPES.parents[1]
    for name in ("src", "recipes", "benchmarks"):
        (tmp_path / name).symlink_to(repo / name)
    return {"OMP_NUM_THREADS": "2", **os.environ, "PYTHONPATH": str(repo / "src"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "COMP": "--prompts 2 --images-per-prompt 1 --steps 2 --device cpu", **env}


def test_reproduce_stand_in_times_stages_whose_start_is_missing(tmp_path):
    """--stand-in: a stage whose start is not in the folder starts from the given model (a conversion takes its VAE
    for a missing decoder), a stage whose start was made here starts from that, and times.jsonl says which stages
    the model stood in for; a stand-in that is not a file is refused before anything runs."""
    import json
    import subprocess
    import sys

    from estable.checkpoints.io import read_safetensors
    from estable.pipeline import default_model_path

    shipped = default_model_path()
    out = _reproduce(tmp_path, "fifth", "part7", "--stand-in", str(shipped), *DRY_RUN)
    commands = [line.split()[2:] for line in out.splitlines() if line.startswith("$ estable ")]
    assert commands[0][:3] == ["convert", str(shipped), str(tmp_path / "fifth.safetensors")]
    assert commands[0][commands[0].index("--vae") + 1] == str(shipped)
    part7 = next(c for c in commands if "--run-dir" in c)
    assert f"init_from={tmp_path / 'fifth.safetensors'}" in part7  # made by this call: no stand-in
    ours, theirs = read_safetensors(tmp_path / "fifth.safetensors")[0], read_safetensors(shipped)[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    times = [json.loads(line) for line in (tmp_path / "times.jsonl").read_text().splitlines()]
    assert [(t["stage"], t.get("stand_in"), t.get("finished")) for t in times] == [
        ("fifth", ["part6", "decoder"], None), ("fifth", None, True), ("part7", None, None), ("part7", None, None),
        ("part7", None, True)]
    # --report adds them up: part7's two commands, the stand-in named, the stages not timed listed
    out = _reproduce(tmp_path, "fifth", "part7", "part8", "--report", str(tmp_path / "times.jsonl"))
    part7 = sum(t["seconds"] for t in times if t["stage"] == "part7" and "seconds" in t)
    row = next(line.split() for line in out.splitlines() if line.startswith("part7 "))
    assert float(row[1]) == pytest.approx(part7, abs=0.051)
    assert "(from a stand-in for decoder, part6)" in out and "2 of 3 stages timed" in out
    assert "not timed yet: part8" in out and "the chain on one GPU" not in out
    out = _reproduce(tmp_path, "fifth", "part7", "--report", str(tmp_path / "times.jsonl"))
    assert "2 of 2 stages timed" in out and "the chain on one GPU:" in out
    proc = subprocess.run([sys.executable, str(RECIPES / "reproduce.py"), "--dir", str(tmp_path / "b"), "part2",
                           "--stand-in", str(tmp_path / "nothing.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such model file" in proc.stderr and not (tmp_path / "b").exists()


def test_reproduce_budget_stops_a_stage_and_the_next_call_resumes_it(tmp_path):
    over = [*DRY_RUN, "max_steps=3", "log_every=1"]
    # 0.4 minutes, half a minute kept for the export: the stage starts with none and stops at its first check
    out = _reproduce(tmp_path, "vae", "--minutes", "0.4", "--min-start", "0", *over)
    assert "vae: stopped by the budget at step 1" in out
    out = _reproduce(tmp_path, "vae", *over)
    assert "--resume" in out and "vae: done" in out
    assert (tmp_path / "vae" / "checkpoints" / "step_0000003").is_dir()
    out = _reproduce(tmp_path, "clip", "--minutes", "1", *over)  # 1 minute left is under --min-start's 5
    assert "clip not started" in out and not (tmp_path / "clip").exists()


@pytest.mark.heavy
def test_wide_stages_train_continue_export_and_score(tmp_path):
    """train_gpu.sh's wide stage, then wide-more from its model, as CPU dry runs in a folder of their own: each
    model comes into OUT in parts that join into a file with the shipped settings and is scored into OUT/NAME-score;
    wide-more starts from the wide model (at a learning rate of 1e-12 its U-Net comes out as the wide one's)."""
    import json
    import subprocess

    from estable.checkpoints.io import read_safetensors
    from estable.checkpoints.store import load_model

    env = stage_folder(tmp_path)
    tiny = " ".join(DRY_RUN + ["model.sample_size=8", "compile=false"])

    def stage(name, extra):
        proc = subprocess.run(["bash", "recipes/default/train_gpu.sh", name, "out"], cwd=tmp_path,
                              env={**env, "EXTRA": f"{tiny} {extra}"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        parts = sorted((tmp_path / "out").glob(f"{name}-model.part-*"))
        joined = tmp_path / f"{name}.safetensors"
        joined.write_bytes(b"".join(p.read_bytes() for p in parts))
        model = load_model(joined)
        assert model.config.default_cfg == 3.5 and model.config.prompt_completion == "shapes-grey-background"
        score = json.loads((tmp_path / "out" / f"{name}-score" / "compositional.json").read_text())
        assert score["images_per_prompt"] == 1 and len(score["per_prompt"]) == 2
        return read_safetensors(joined)[0]

    wide = stage("wide", "optim.lr=1e-2 optim.warmup_steps=0")  # far from its initialisation in two steps
    more = stage("wide-more", "optim.lr=1e-12 optim.warmup_steps=0")
    assert (tmp_path / "runs" / "wide-more-cache" / "latents_cache.0-of-1.safetensors").is_file()
    unet = [k for k in wide if k.startswith("unet.")]
    assert unet and all(torch.allclose(wide[k].float(), more[k].float(), atol=1e-3) for k in unet)


@pytest.mark.heavy
def test_spikefree_stage_picks_a_vae_trains_the_unet_on_it_and_scores(tmp_path):
    """train_gpu.sh's spikefree stage as a CPU dry run: both VAE arms are measured, the one with the smaller error
    near the shipped spikes is baked into the model (its weights and the scaling factor its run measured), and the
    model and the shipped one are scored into OUT."""
    import json
    import re
    import subprocess

    from estable.checkpoints.io import read_safetensors
    from estable.checkpoints.store import load_model
    from estable.training.builders import load_network

    env = stage_folder(tmp_path, VAE_EXTRA=" ".join(DRY_RUN), EXTRA=" ".join(DRY_RUN + ["compile=false"]),
                       SCORE_PARTS="compositional", SPIKES="--images 2 --psnr-images 2 --crops 2",
                       GRID="--rows 1 --columns 1 --cell 32")
    proc = subprocess.run(["bash", "recipes/default/train_gpu.sh", "spikefree", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    errors = {}
    for arm in ("vae-sf-plain", "vae-sf-droplet"):
        text = (out / f"{arm}-spikes.txt").read_text()
        errors[arm] = float(re.search(r"^model: mean error near the reference's spikes ([\d.]+)", text, re.M)[1])
        assert (out / f"{arm}-crops.png").is_file()
    best = min(errors, key=errors.get)
    assert f"the U-Net on {best}'s latents" in (out / "progress.txt").read_text()
    joined = tmp_path / "spikefree.safetensors"
    joined.write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob("spikefree-model.part-*"))))
    model = load_model(joined)
    assert model.config.default_cfg == 3.5 and model.config.prompt_completion == "shapes-grey-background"
    vae_cfg, vae_sd = load_network("vae", tmp_path / "runs" / best)
    assert model.config.vae.scaling_factor == pytest.approx(vae_cfg.scaling_factor)
    weights = read_safetensors(joined)[0]
    key = next(k for k in vae_sd if "decoder" in k and k.endswith("weight"))
    assert torch.allclose(weights[f"vae.{key}"].float(), vae_sd[key].half().float())
    for name in ("spikefree-score", "shipped-score"):
        score = json.loads((out / name / "compositional.json").read_text())
        assert score["images_per_prompt"] == 1 and len(score["per_prompt"]) == 2
    assert "generated, 'a red circle above a blue square'" in (out / "spikefree-spikes.txt").read_text()
    assert (out / "spikefree-samples.png").is_file()


@pytest.mark.heavy
def test_decoders_stage_trains_its_decoders_bakes_each_in_and_scores(tmp_path):
    """train_gpu.sh's decoders stage as a CPU dry run (SF: the shipped file, to run the sfworst arm): each decoder
    comes out of its run's EMA into a model whose encoder is its base's, measured, drawn and scored into OUT."""
    import json
    import subprocess

    from estable.checkpoints.io import read_safetensors

    asset = "src/estable/assets/default_model.safetensors"
    env = stage_folder(tmp_path, SF=asset, FID="--steps 2 --device cpu", FID_COUNT="8",
                       VAE_EXTRA=" ".join(DRY_RUN + ["save_every=2", "val_every=0", "sample_every=0"]),
                       SPIKES="--images 2 --psnr-images 2 --crops 2", GRID="--rows 1 --columns 1 --cell 32",
                       DEVICE="cpu", STRAY="--seeds 1 --renders 2", ARMS="contact sfworst", DEC_UNTIL="1")
    bad = subprocess.run(["bash", "recipes/default/train_gpu.sh", "decoders", "out"], cwd=tmp_path,
                         env={**env, "ARMS": "worst wurst"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no arm 'wurst'" in bad.stderr and not (tmp_path / "runs" / "dec-worst").exists()
    proc = subprocess.run(["bash", "recipes/default/train_gpu.sh", "decoders", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    shipped = read_safetensors(tmp_path / asset)[0]
    stray = json.loads((out / "stray.json").read_text())
    arms = ("contact", "sfworst")  # the gan arm's trainer path is test_training's
    assert set(stray["models"]) == {"default"} | {f"runs/dec-{n}-model.safetensors" for n in arms}
    assert len(stray["models"]["default"]["generated"]["per_image"]) == 8  # the grid's prompts at seed 1
    for name in arms:  # DEC_UNTIL stops each run at that step, before its max_steps (2)
        assert (tmp_path / "runs" / f"dec-{name}" / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    contact = json.loads((tmp_path / "runs" / "dec-contact" / "config.json").read_text())
    assert contact["worst_weight"] == 0.3 and contact["data"]["shapes_contact"] == 0.5
    for name in arms:
        weights = read_safetensors(tmp_path / "runs" / f"dec-{name}-model.safetensors")[0]
        encoder = [k for k in shipped if k.startswith("vae.encoder.")]
        decoder = [k for k in shipped if k.startswith("vae.decoder.")]
        assert encoder and all(torch.equal(weights[k], shipped[k]) for k in encoder)
        assert any(not torch.equal(weights[k], shipped[k]) for k in decoder)  # the fine-tuned decoder is in
        assert "model: mean error near" in (out / f"dec-{name}-spikes.txt").read_text()
        assert (out / f"dec-{name}-samples.png").is_file() and (out / f"dec-{name}-crops.png").is_file()
        for part in ("compositional", "fid"):
            assert (out / f"dec-{name}-score" / f"{part}.json").is_file()
    log = (out / "dec-contact_log.jsonl").read_text()
    assert '"worst"' in log and '"worst"' in (out / "dec-sfworst_log.jsonl").read_text()
