"""The shipped built-in model from nothing, on one GPU: its thirty-four stages in order, one `estable` command each.

    python3 recipes/default/reproduce.py [STAGE ...] [--dir runs/repro] [--minutes M] [--stand-in MODEL] [KEY=VALUE ...]

The stages are the chain that made ``src/estable/assets/default_model.safetensors`` (recipes/default/README.md, "How
the shipped model was made"): the VAE and the CLIP pair, twelve U-Net parts each starting from the one before, the
decoder fine-tune, and the conversions that put the decoder in (the fifth shipped model), the recommended settings
on (the sixth) and, after part 8, the prompt completion the shipped file names (the seventh; parts 9 to 12 made the
eighth to the eleventh, with the same settings); last, the eleventh's decoder fine-tuned again against stray pixels
(``decoder2``, the twelfth), once more from there (``decoder3``, the thirteenth), then three times on a world whose
two-colour scenes touch half the time (``contact``, the fourteenth; ``contact2``, not shipped; ``contact3``, the
fifteenth); then the fifteenth's U-Net fine-tuned on pairs of its own right and wrong images as the judge grades them
(``sixteenth``: ``estable train preference``); last, the sixteenth's text encoder taught the paraphrase test's four
phrasings as synonyms of the grammar's (``model``: ``estable train synonyms``, the seventeenth, the shipped file).
Runs that stopped by their time budget on the machines they ran on stop at the same step here (``--until``), on the
schedule they were planned with; runs made on two GPUs train their global batch on one.

Each command is printed as it starts, and its log goes to ``DIR/<stage>.log``. A stage whose output is in ``DIR``
is skipped, so calling the script again continues the chain; ``--minutes`` is a budget for this call (for
time-limited jobs): a training stage gets what is left as its ``max_minutes`` and stops with a checkpoint, the
next call resumes it, and no stage starts with less than ``--min-start`` minutes left (without ``--minutes`` the
configs' own ``max_minutes``, the shipped runs' budgets, are lifted). Every command's wall time is appended to
``DIR/times.jsonl``. ``KEY=VALUE`` overrides go to every training command after the stage's own, and
``preference.KEY=VALUE`` (``synonyms.KEY=VALUE``) to the preference (synonyms) stage as ``--KEY VALUE`` (a CPU dry
run: ``max_steps=2 batch_size=2 device=cpu precision=fp32 data.num_workers=0 data.size=64 data.shapes_length=8
preference.prompts=2 preference.seeds=2 preference.steps=2 preference.device=cpu synonyms.scenes=4
synonyms.steps=2 synonyms.device=cpu``). The model ends as ``DIR/model.safetensors``.

After the chain come the stages of a model not shipped yet, run only when named: the wide U-Net from nothing on the
shipped model's text encoder and VAE (``wide1``, ``wide2``, ``wide3``, as run so far), put into ``DIR/wide.safetensors``
with the shipped settings (``wide``): ``reproduce.py wide1 wide2 wide3 wide`` after the chain.

``--stand-in MODEL`` times stages on a machine that lacks what they start from (a lent machine starts bare, and
what a stage makes is too large to carry to the next one): a stage whose start is not in ``DIR`` starts from MODEL
instead (its U-Net, text encoder and VAE). Such a stage makes a model that is not the recipe's, in the recipe's
time: the data, the steps and the batch are the stage's own, and a step takes as long whatever weights it starts
from. Its lines in ``times.jsonl`` say ``"stand_in"``: the stages it stood in for, and a stage that ends adds a line
``{"stage": NAME, "finished": true}``. ``--report FILE ...`` adds up such files (one per session, in order): each
stage's time is the sum of its lines in the last file where it finished; it prints the stages not timed yet, and the
chain's one-GPU time once none is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from estable.training.config import load_config
from estable.training.runs import latest_checkpoint

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # a trainer (vae, clip, unet), "convert", "preference" or "synonyms" (estable train preference/synonyms)
    config: str = ""  # the recipe's config file
    start: str = ""  # the stage whose model this one starts from (its weights, text encoder and VAE)
    overrides: tuple[str, ...] = ()
    until: int | None = None  # the step the shipped run stopped at by its time budget (None: its max_steps)
    convert: tuple[str, ...] = ()  # for "convert": the options after --to estable
    text_from: str = ""  # a U-Net from nothing whose text encoder and VAE are this stage's file's
    options: tuple[str, ...] = ()  # for "preference" / "synonyms": the command's options (before the caller's)
    shipped: bool = True  # False: a stage of a model not shipped yet, run only when named


# what the shipped file records: its guidance scale and sampler, and the completion of prompts that name no background
SHIPPED_SETTINGS = ("--default-cfg", "3.5", "--default-sampler", "dpmpp_2m", "--prompt-completion",
                    "shapes-grey-background")

STAGES = (
    # part 1 ran on two H100s: the VAE at 2 × 64, the U-Net at 2 × 128 for 1,050 steps
    Stage("vae", "vae", "vae.json", overrides=("batch_size=128", "val_every=500", "sample_every=0")),
    Stage("clip", "clip", "clip.json"),
    Stage("part1", "unet", "unet.json", overrides=("batch_size=256", "max_steps=1050", "optim.warmup_steps=200",
                                                   "val_every=0", "sample_every=0")),
    # part 2 ran on two H200s at 2 × 256 and stopped by its 11-minute budget
    Stage("part2", "unet", "unet_continue.json", start="part1", overrides=("batch_size=512",), until=5700),
    Stage("part3", "unet", "unet_relations_long.json", start="part2", overrides=("text.train=true", "text.lr=5e-5")),
    Stage("part4", "unet", "unet_zero_snr_long.json", start="part3", until=7500),
    Stage("part5", "unet", "unet_roles.json", start="part4"),
    Stage("decoder", "vae", "vae_decoder.json", start="part5", until=1450),
    Stage("part6", "unet", "unet_count.json", start="part5", until=1750),
    Stage("fifth", "convert", start="part6", convert=("--default-cfg", "5", "--vae", "{decoder}")),
    Stage("part7", "unet", "unet_mix.json", start="fifth", until=3100),
    Stage("sixth", "convert", start="part7", convert=("--default-cfg", "4", "--default-sampler", "dpmpp_2m")),
    # part 8: half the captions that name no background name its grey; the model's file then completes such prompts
    Stage("part8", "unet", "unet_grey_named.json", start="sixth"),
    Stage("seventh", "convert", start="part8", convert=SHIPPED_SETTINGS),
    # part 9: pairs laid out further from the diagonal than the relation needs (data.shapes_relation_axis_ratio 1.5)
    Stage("part9", "unet", "unet_axis.json", start="seventh"),
    Stage("eighth", "convert", start="part9", convert=SHIPPED_SETTINGS),
    # part 10: a second round from the eighth, new scenes (world seed 61) at ratio 2
    Stage("part10", "unet", "unet_axis.json", start="eighth",
          overrides=("data.shapes_seed=61", "data.shapes_relation_axis_ratio=2")),
    Stage("ninth", "convert", start="part10", convert=SHIPPED_SETTINGS),
    # part 11: a third round from the ninth, new scenes (world seed 63) at ratio 2.5
    Stage("part11", "unet", "unet_axis.json", start="ninth",
          overrides=("data.shapes_seed=63", "data.shapes_relation_axis_ratio=2.5")),
    Stage("tenth", "convert", start="part11", convert=SHIPPED_SETTINGS),
    # part 12: a fourth round from the tenth, new scenes (world seed 67) at ratio 2.5, half the prompts counts
    Stage("part12", "unet", "unet_axis.json", start="tenth",
          overrides=("data.shapes_seed=67", "data.shapes_relation_axis_ratio=2.5",
                     'data.shapes_kinds={"single":0.1,"count":0.5,"pair":0.3,"colour_binding":0.1}')),
    Stage("eleventh", "convert", start="part12", convert=SHIPPED_SETTINGS),
    # the decoder fine-tuned again with the error of each image's worst pixels (the stray spots), encoder frozen
    Stage("decoder2", "vae", "vae_decoder.json", start="eleventh", overrides=("worst_weight=0.3",), until=3100),
    Stage("twelfth", "convert", start="eleventh", convert=(*SHIPPED_SETTINGS, "--vae", "{decoder2}")),
    # the same again from the twelfth's decoder (its schedule started anew), alone on the card
    Stage("decoder3", "vae", "vae_decoder.json", start="twelfth", overrides=("worst_weight=0.3",), until=3100),
    Stage("thirteenth", "convert", start="twelfth", convert=(*SHIPPED_SETTINGS, "--vae", "{decoder3}")),
    # the same term from the thirteenth's decoder on a world where half the two-colour scenes have their objects
    # touching (the colour blends where they meet), alone on the card
    Stage("contact", "vae", "vae_decoder.json", start="thirteenth",
          overrides=("worst_weight=0.3", "data.shapes_contact=0.5"), until=3000),
    Stage("fourteenth", "convert", start="thirteenth", convert=(*SHIPPED_SETTINGS, "--vae", "{contact}")),
    # twice more from there, each from the last one's decoder (the schedule started anew); the second file was not
    # shipped (its demo median rose) but its decoder is where the third started
    Stage("contact2", "vae", "vae_decoder.json", start="fourteenth",
          overrides=("worst_weight=0.3", "data.shapes_contact=0.5"), until=3000),
    Stage("contact2_model", "convert", start="fourteenth", convert=(*SHIPPED_SETTINGS, "--vae", "{contact2}")),
    Stage("contact3", "vae", "vae_decoder.json", start="contact2_model",
          overrides=("worst_weight=0.3", "data.shapes_contact=0.5"), until=3000),
    Stage("fifteenth", "convert", start="contact2_model", convert=(*SHIPPED_SETTINGS, "--vae", "{contact3}")),
    # the fifteenth's U-Net taught from its own images, graded by the judge: pairs of right and wrong images of 2,000
    # count and 2,000 pair prompts of the train split, 8 seeds each; 150 DPO steps; half of the way from the fifteenth's
    # weights to the fine-tuned ones (the command's defaults; estable.training.preference)
    Stage("sixteenth", "preference", start="fifteenth"),
    # the sixteenth's text encoder taught the paraphrase test's four phrasings as synonyms of the grammar's (the
    # command's defaults, on the CPU as the shipped file was; estable.training.synonyms)
    Stage("model", "synonyms", start="sixteenth", options=("--device", "cpu")),
    # Not shipped (yet): the wide U-Net (56, 112, 168) from nothing on the shipped text encoder and VAE, as run so far
    # (RESULTS.md, "the wide U-Net from nothing" and "the wide U-Net trained on"); run by name, after the chain above
    Stage("wide1", "unet", "unet_wide.json", text_from="sixteenth", shipped=False),
    Stage("wide2", "unet", "unet_wide.json", start="wide1", shipped=False,
          overrides=("max_steps=4000", "optim.lr=2e-4", "optim.warmup_steps=100")),
    Stage("wide3", "unet", "unet_wide_more.json", start="wide2", shipped=False, overrides=("max_steps=11000",),
          until=10700),
    Stage("wide", "convert", start="wide3", convert=SHIPPED_SETTINGS, shipped=False),
)
BY_NAME = {s.name: s for s in STAGES}
# decoder-only fine-tunes: their output is the EMA weights a conversion puts in
DECODERS = ("decoder", "decoder2", "decoder3", "contact", "contact2", "contact3")


class Chain:
    def __init__(self, folder: Path, extra: list[str], minutes: float | None, stand_in: Path | None = None) -> None:
        self.dir = folder
        self.stand_in = stand_in
        self.stood_in: list[str] = []  # the stages the stand-in model stood in for in the stage being run
        # "preference.KEY=VALUE" goes to the preference stage as --KEY VALUE (and "synonyms." to the synonyms
        # stage), the rest to every training command
        self.options: dict[str, list[str]] = {"preference": [], "synonyms": []}
        self.extra = []
        for e in extra:
            command, dot, rest = e.partition(".")
            if dot and command in self.options:
                key, value = rest.split("=", 1)
                self.options[command] += [f"--{key.replace('_', '-')}", value]
            else:
                self.extra.append(e)
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def left(self) -> float | None:
        """Minutes left in this call's budget (None: no budget)."""
        return None if self.deadline is None else (self.deadline - time.monotonic()) / 60

    def output(self, stage: Stage) -> Path:
        """What a later stage reads: a run folder (VAE, CLIP), the decoder's EMA weights, or a model file."""
        if stage.name in ("vae", "clip"):
            return self.dir / stage.name
        if stage.name in DECODERS:
            found = latest_checkpoint(self.dir / stage.name / "checkpoints")
            return (found if found is not None else self.dir / stage.name / "missing") / "ema.safetensors"
        return self.dir / f"{stage.name}.safetensors"

    def source(self, name: str) -> Path:
        """What stage ``name`` made, for a later stage to read; the stand-in model when it is not there."""
        stage = BY_NAME[name]
        if self.stand_in is None or self.finished(stage):
            return self.output(stage)
        if name not in self.stood_in:
            self.stood_in.append(name)
        return self.stand_in

    def training_overrides(self, stage: Stage) -> list[str]:
        own = list(stage.overrides)
        if stage.name == "part1":
            own += [f"text.source={self.source('clip')}", f"vae.source={self.source('vae')}"]
        elif stage.text_from:
            model = self.source(stage.text_from)
            own += [f"text.source={model}", f"vae.source={model}"]
        elif stage.start and stage.kind == "unet":
            model = self.source(stage.start)
            own += [f"init_from={model}", f"text.source={model}", f"vae.source={model}"]
        elif stage.start:
            own.append(f"init_from={self.source(stage.start)}")
        return own + self.extra

    def target(self, stage: Stage) -> int:
        steps = load_config(stage.kind, HERE / stage.config, [*stage.overrides, *self.extra]).max_steps
        return steps if stage.until is None else min(stage.until, steps)

    def trained_to(self, stage: Stage) -> int:
        found = latest_checkpoint(self.dir / stage.name / "checkpoints")
        return 0 if found is None else int(found.name.split("_")[-1])

    def finished(self, stage: Stage) -> bool:
        if stage.kind in ("convert", "unet", "preference", "synonyms"):
            return self.output(stage).is_file()
        return self.trained_to(stage) >= self.target(stage)

    def run(self, stage: Stage, argv: list[str]) -> None:
        """One command, printed, its output appended to the stage's log; its wall time to times.jsonl."""
        cmd = [sys.executable, "-m", "estable.cli", *argv]
        print("$ estable " + " ".join(argv), flush=True)
        t = time.monotonic()
        with open(self.dir / f"{stage.name}.log", "a") as log:
            status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - t
        line = {"stage": stage.name, "command": argv[0:2], "seconds": round(seconds, 1), "status": status}
        if self.stood_in:
            line["stand_in"] = list(self.stood_in)
        self.record(line)
        if status != 0:
            raise SystemExit(f"{stage.name}: the command failed (status {status}); see {self.dir / stage.name}.log")

    def record(self, line: dict) -> None:
        """One line of ``times.jsonl``."""
        with open(self.dir / "times.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def stage(self, stage: Stage) -> bool:
        """Run ``stage`` (or what is left of it); False when this call's budget stopped it."""
        self.stood_in = []
        if stage.kind == "convert":
            source = self.source(stage.start)
            options = [o.format(**{name: self.source(name) for name in DECODERS if "{" + name + "}" in o})
                       for o in stage.convert]
            self.run(stage, ["convert", str(source), str(self.output(stage)), "--to", "estable", *options])
            return True
        if stage.kind in ("preference", "synonyms"):
            self.run(stage, ["train", stage.kind, str(self.source(stage.start)), str(self.output(stage)),
                             "--work", str(self.dir / f"{stage.name}-work"), "--overwrite", *stage.options,
                             *self.options[stage.kind]])
            return True
        run_dir = self.dir / stage.name
        target = self.target(stage)
        if self.trained_to(stage) < target:
            argv = ["train", stage.kind, "--config", str(HERE / stage.config), "--run-dir", str(run_dir),
                    "--no-progress", "--until", str(target)]
            if latest_checkpoint(run_dir / "checkpoints") is not None:
                argv.append("--resume")
            left = self.left()  # the configs' own budgets are the shipped runs'; here --until stops each run
            budget = ["max_minutes=null"] if left is None else [f"max_minutes={max(left - 0.5, 0):.3f}"]
            self.run(stage, argv + self.training_overrides(stage) + budget)
            if self.trained_to(stage) < target:
                return False
        if stage.kind == "unet":
            self.run(stage, ["train", "export", str(run_dir), str(self.output(stage)), "--dtype", "fp16"])
        return True


def report(files: list[Path], stages: list[Stage]) -> None:
    """Print each stage's wall time from ``times.jsonl`` files (the last file where it finished counts), the stages
    no file has timed, and the sum."""
    timed: dict[str, tuple[float, list[str], str]] = {}
    for file in files:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        for name in {r["stage"] for r in rows if r.get("finished")}:
            own = [r for r in rows if r["stage"] == name and "seconds" in r]
            stood = sorted({s for r in own for s in r.get("stand_in", [])})
            timed[name] = (sum(r["seconds"] for r in own), stood, file.name)
    total = 0.0
    for stage in stages:
        if stage.name in timed:
            seconds, stood, where = timed[stage.name]
            total += seconds
            note = f" (from a stand-in for {', '.join(stood)})" if stood else ""
            print(f"{stage.name:16s} {seconds:8.1f} s  {where}{note}")
    missing = [s.name for s in stages if s.name not in timed]
    done = len(stages) - len(missing)
    print(f"{done} of {len(stages)} stages timed: {total:.1f} s ({total / 60:.1f} minutes)")
    if missing:
        print(f"not timed yet: {', '.join(missing)}")
    else:
        print(f"the chain on one GPU: {total / 60:.1f} minutes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", metavar="STAGE|KEY=VALUE",
                    help="stages to run, in the chain's order (default: the shipped model's): "
                         f"{', '.join(BY_NAME)}; then overrides")
    ap.add_argument("--dir", type=Path, default=Path("runs/repro"), help="the chain's folder (default runs/repro)")
    ap.add_argument("--minutes", type=float, help="this call's time budget (default: none)")
    ap.add_argument("--stand-in", type=Path, metavar="MODEL",
                    help="to time stages without what they start from: a stage whose start is not in DIR starts from "
                    "this model file instead (not the recipe's model; times.jsonl marks it)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                    help="add up times.jsonl files (one per session, in order) instead of running anything")
    ap.add_argument("--min-start", type=float, default=5.0,
                    help="start no stage with fewer minutes than this left in the budget (default 5)")
    args = ap.parse_intermixed_args()
    names = [a for a in args.stages if "=" not in a]
    extra = [a for a in args.stages if "=" in a]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown stage {unknown[0]!r}; the stages are {', '.join(BY_NAME)}")
    chosen = [s for s in STAGES if s.name in names or (not names and s.shipped)]
    if args.report:
        for file in args.report:
            if not file.is_file():
                ap.error(f"--report {file}: no such file")
        report(args.report, chosen)
        return 0
    if args.stand_in is not None and not args.stand_in.is_file():
        ap.error(f"--stand-in {args.stand_in}: no such model file")
    args.dir.mkdir(parents=True, exist_ok=True)
    chain = Chain(args.dir, extra, args.minutes, args.stand_in)
    for stage in chosen:
        if chain.finished(stage):
            print(f"{stage.name}: done already", flush=True)
            continue
        left = chain.left()
        if left is not None and left < args.min_start:
            print(f"{left:.1f} minutes left: {stage.name} not started; call again to continue", flush=True)
            return 0
        if not chain.stage(stage):
            print(f"{stage.name}: stopped by the budget at step {chain.trained_to(stage)}; call again to continue",
                  flush=True)
            return 0
        chain.record({"stage": stage.name, "finished": True})
        print(f"{stage.name}: done", flush=True)
    # the last model file this call asked for
    made = [chain.output(s) for s in chosen if s.kind in ("convert", "preference", "synonyms")]
    if made and made[-1].is_file():
        print(f"{made[-1]}: sha256 {hashlib.sha256(made[-1].read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
