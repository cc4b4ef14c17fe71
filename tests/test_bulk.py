"""Bulk generation (``estable generate --prompts FILE --out DIR``): parsing, file names, batching across prompts,
resuming, and two gloo ranks under torchrun making exactly the whole set with no image made twice."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import estable.cli as cli
from estable.bulk import group_batches, plan_items, read_prompt_file, shard
from estable.errors import EstableError
from estable.provenance.infotext import read_png_metadata
from tiny_model import tiny_model_file
from torchrun import run_workers

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = ['"a red circle"', "", '{"prompt": "two blue squares", "batch_size": 2, "seed": 3}',
         '{"prompt": "a green star", "negative_prompt": "red"}', '"a yellow triangle"',
         '{"prompt": "three red circles", "steps": 3}']
# (line number, image index) of every image the file asks for
EXPECTED = {"000001-000.png", "000003-000.png", "000003-001.png", "000004-000.png", "000005-000.png",
            "000006-000.png"}
FLAGS = ["--device", "cpu", "--steps", "2", "--seed", "5", "--size", "32x32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("bulk_model"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def _run(capsys, *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, [line for line in out.splitlines() if line], err


def test_prompt_file_lines_defaults_and_seeds(tmp_path, prompts):
    lines = read_prompt_file(prompts, {"steps": 4, "negative_prompt": "blurry"}, base_seed=5)
    assert [ln.number for ln in lines] == [1, 3, 4, 5, 6]
    assert [ln.index for ln in lines] == [0, 1, 2, 3, 4]
    assert lines[0].params.prompt == "a red circle" and lines[0].params.steps == 4
    assert lines[0].params.seed == 5  # --seed S: line n gets S + (n - 1) * 1000
    assert lines[3].params.seed == 5 + 4 * 1000
    assert lines[1].params.seed == 3 and lines[1].params.batch_size == 2  # the line's own values win
    assert lines[2].params.negative_prompt == "red" and lines[3].params.negative_prompt == "blurry"
    assert lines[4].params.steps == 3

    txt = tmp_path / "p.txt"
    txt.write_text('{"not": "json here"}\n\n  a plain prompt  \n', encoding="utf-8")
    plain = read_prompt_file(txt)
    assert [ln.params.prompt for ln in plain] == ['{"not": "json here"}', "a plain prompt"]  # literal in .txt
    assert not plain[0].seeded and plain[0].params.seed == -1  # random, resolved when generated

    bad = tmp_path / "bad.jsonl"
    for body, words in (('"ok"\n{"prompt": "x", "stepz": 3}\n', "2: unknown generation parameter"),
                        ('"ok"\n{not json\n', "2: not valid JSON"), ("[1, 2]\n", "1: a line must be"),
                        ('{"steps": 3}\n', "1: the request has no prompt"), ("\n\n", "holds no prompt"),
                        ('{"prompt": "x", "width": 33}\n', "1: width 33 is not a multiple of 8")):
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(EstableError, match=words):
            read_prompt_file(bad)
    with pytest.raises(EstableError, match="no such file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_sharding_planning_and_batching(tmp_path, prompts):
    lines = read_prompt_file(prompts, {}, base_seed=1)
    parts = [shard(lines, r, 3) for r in range(3)]
    assert sorted(ln.number for p in parts for ln in p) == [ln.number for ln in lines]  # disjoint, complete
    todo, done = plan_items(lines, tmp_path)
    assert {it.name for it in todo} == EXPECTED and done == 0
    (tmp_path / "000003-001.png").write_bytes(b"x")
    todo, done = plan_items(lines, tmp_path)
    assert {it.name for it in todo} == EXPECTED - {"000003-001.png"} and done == 1
    batches = list(group_batches(todo, 2))
    assert all(len(b) <= 2 for b in batches) and sum(map(len, batches)) == len(todo)
    for b in batches:  # only images with the same sampler settings share a run (line 6 has 3 steps)
        assert len({it.line.params.steps for it in b}) == 1


def test_bulk_generate_resume_and_same_image_as_generate(capsys, tmp_path, model, prompts):
    out = tmp_path / "out"
    status, paths, err = _run(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model, *FLAGS,
                              "--batch", "3")
    assert status == 0, err
    assert {Path(p).name for p in paths} == EXPECTED == {p.name for p in out.iterdir()}
    assert "6 images made" in err and "0 already there" in err
    # line 3 image 1: seed 3 + 1, and its record says so
    _, record = read_png_metadata(out / "000003-001.png")
    assert record["params"]["seed"] == 4 and record["params"]["prompt"] == "two blue squares"

    # The image of line 4 (made in a batch with other prompts) is the image `generate` makes alone.
    single = tmp_path / "single.png"
    status, _, err = _run(capsys, "generate", "a green star", "--negative", "red", "--model", model, *FLAGS[:4],
                          "--seed", str(5 + 3 * 1000), "--size", "32x32", "--out", single)
    assert status == 0, err
    a = np.asarray(Image.open(single), dtype=np.int16)
    b = np.asarray(Image.open(out / "000004-000.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    other = np.asarray(Image.open(out / "000005-000.png"), dtype=np.int16)
    assert np.abs(a - other).max() > 10  # a different prompt and seed do change the picture

    # Resume: only the missing images are made; the others are left as they are.
    (out / "000003-001.png").unlink()
    (out / "000006-000.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status, paths, err = _run(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model, *FLAGS)
    assert status == 0, err
    assert sorted(Path(p).name for p in paths) == ["000003-001.png", "000006-000.png"]
    assert "2 images made" in err and "4 already there" in err
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    assert not list(out.glob(".*.tmp"))
    status, paths, err = _run(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model, *FLAGS)
    assert status == 0 and paths == [] and "0 images made" in err and "6 already there" in err


def test_bulk_errors(capsys, tmp_path, model, prompts):
    for argv, words in ((["a prompt", "--prompts", prompts, "--out", tmp_path], "either a PROMPT or --prompts"),
                        (["--prompts", prompts], "needs --out"),
                        (["--prompts", prompts, "--out", tmp_path / "x.png"], "must be a folder"),
                        (["--prompts", prompts, "--out", tmp_path, "--batch", "0"], "--batch must be between"),
                        (["--prompts", tmp_path / "none.txt", "--out", tmp_path], "no such file")):
        status, _, err = _run(capsys, "generate", *argv, "--model", model, "--device", "cpu")
        assert status == 2, err
        assert words in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": "y", "sampler": "bogus"}\n')
    status, _, err = _run(capsys, "generate", "--prompts", bad, "--out", tmp_path / "new", "--model", model,
                          "--device", "cpu")
    assert status == 2 and "line 2: unknown sampler 'bogus'" in err
    assert not (tmp_path / "new").exists()  # refused before the folder was made (and before the model loaded)


WORKER = textwrap.dedent("""
    import json, os, sys
    import estable.cli as cli
    from pathlib import Path
    made = []
    import builtins
    real_print = builtins.print
    def capture(*a, **k):
        if not k.get("file") and a and str(a[0]).endswith(".png"):
            made.append(Path(str(a[0])).name)
        real_print(*a, **k)
    builtins.print = capture
    prompts, out, model = sys.argv[1:4]
    status = cli.main(["generate", "--prompts", prompts, "--out", out, "--model", model, "--device", "cpu",
                       "--steps", "2", "--seed", "5", "--size", "32x32", "--batch", "2"])
    assert status == 0, status
    Path(out).parent.joinpath("made-rank" + os.environ["RANK"] + ".json").write_text(json.dumps(made))
""")


def test_two_gloo_ranks_make_the_union_once(tmp_path, model, prompts):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000005-000.png").write_bytes(b"done before")  # a previous run's image: skipped by its rank
    run_workers(tmp_path, WORKER, str(prompts), str(out), str(model))
    made = [json.loads((tmp_path / f"made-rank{r}.json").read_text()) for r in range(2)]
    assert made[0] and made[1], made  # both ranks worked
    assert not set(made[0]) & set(made[1]), made  # no image made twice
    assert sorted(made[0] + made[1]) == sorted(EXPECTED - {"000005-000.png"})
    assert {p.name for p in out.iterdir()} == EXPECTED
    assert (out / "000005-000.png").read_bytes() == b"done before"
    # rank r took the lines whose index mod 2 == r: lines 1, 4, 6 (indices 0, 2, 4) went to rank 0
    assert {n[:6] for n in made[0]} == {"000001", "000004", "000006"}


def test_bulk_images_get_the_provenance_of_generate(capsys, tmp_path, model, prompts):
    """Bulk PNGs are stamped as `generate`'s: DWT watermark and a completed record by default, none with
    --no-watermark; a blocked prompt in any line stops the run before anything is made."""
    marked, plain = tmp_path / "marked", tmp_path / "plain"
    big = [*FLAGS, "--size", "128x128"]  # 32² is too small to hold the watermark's message
    status, paths, err = _run(capsys, "generate", "--prompts", prompts, "--out", marked, "--model", model, *big)
    assert status == 0, err
    status, _, err = _run(capsys, "generate", "--prompts", prompts, "--out", plain, "--model", model, *big,
                          "--no-watermark")
    assert status == 0, err
    _, record = read_png_metadata(marked / "000001-000.png")
    assert record["watermark"]["dwtdct"]["enabled"] and len(record["pixels"]["sha256"]) == 64
    _, record = read_png_metadata(plain / "000001-000.png")
    assert not record["watermark"]["dwtdct"]["enabled"]
    assert cli.main(["verify", "--no-tree-ring", str(marked / "000001-000.png")]) == 0
    assert cli.main(["verify", "--no-tree-ring", str(plain / "000001-000.png")]) == 1

    blocklist = tmp_path / "words.txt"
    blocklist.write_text("star\n", encoding="utf-8")
    out = tmp_path / "refused"
    status, paths, err = _run(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model, *FLAGS,
                              "--blocklist", blocklist)
    assert status == 2 and "line 4" in err and "Traceback" not in err
    assert paths == [] and not (out.exists() and any(out.iterdir()))


def test_bulk_output_check_refusals_are_not_written(tmp_path, model, prompts):
    from estable.bulk import run_bulk
    from estable.pipeline import load_pipeline
    from estable.provenance.policy import ProvenancePolicy

    class RefuseSquares:  # stands in for the CLIP concept check (tested in test_output_check.py)
        calls = 0

        def check(self, images):
            RefuseSquares.calls += 1
            return [("squares", 99.0) if RefuseSquares.calls in (2, 3) else None for _ in images]

    stats = run_bulk(lambda dev: load_pipeline(model, device=dev), prompts, tmp_path / "out",
                     defaults={"steps": 2, "width": 32, "height": 32}, base_seed=5, batch=8, device="cpu",
                     progress=False, policy=ProvenancePolicy(output_check=RefuseSquares()))
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert stats["made"] == 4 and len(stats["refused"]) == 2 and len(written) == 4
    assert written == EXPECTED - {"000003-000.png", "000003-001.png"}
    assert all("squares" in line for line in stats["refused"])


def test_writer_keeps_order_raises_and_bounds_the_queue():
    import threading
    import time

    from estable.bulk import Writer

    release = threading.Event()

    def job(k):
        if k == 0:
            release.wait(5)  # the first job finishes last
        if k == 3:
            raise ValueError("job 3 failed")
        return k

    with Writer(4, limit=8) as w:
        for k in range(3):
            w.submit(job, k)
        time.sleep(0.2)
        assert list(w.ready()) == []  # job 0 is not done: nothing is handed out of order
        release.set()
        assert list(w.ready(wait=True)) == [0, 1, 2]
        w.submit(job, 3)
        with pytest.raises(ValueError, match="job 3 failed"):
            list(w.ready(wait=True))
    gate = threading.Event()

    def slow(k):
        gate.wait(5)
        return k

    with Writer(4, limit=2) as w:  # more than `limit` waiting: ready() waits for the oldest
        for k in range(4):
            w.submit(slow, k)
        threading.Timer(0.3, gate.set).start()
        t0 = time.perf_counter()
        got = list(w.ready())
        assert got[:2] == [0, 1] and time.perf_counter() - t0 > 0.25
    with Writer(0) as w:  # no threads: each job runs at submit
        w.submit(job, 5)
        assert list(w.ready()) == [5]


def test_bulk_lines_get_the_model_recommended_sampler_and_cfg_where_they_name_none(capsys, tmp_path, model):
    import dataclasses

    from estable.checkpoints.store import load_model, save_model

    loaded = load_model(model)
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, default_cfg=4.0,
                                                                     default_sampler="euler"))
    tuned = save_model(loaded, tmp_path / "tuned.safetensors", to="estable")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a red circle"\n{"prompt": "a blue square", "sampler": "ddim", "cfg_scale": 6}\n')
    status, _, err = _run(capsys, "generate", "--prompts", prompts, "--out", tmp_path / "out", "--model", tuned,
                          *FLAGS)
    assert status == 0, err
    got = [read_png_metadata(tmp_path / "out" / f"00000{n}-000.png")[1]["params"] for n in (1, 2)]
    assert [(p["sampler"], p["cfg_scale"]) for p in got] == [("euler", 4.0), ("ddim", 6.0)]
    status, _, err = _run(capsys, "generate", "--prompts", prompts, "--out", tmp_path / "out2", "--model", tuned,
                          "--sampler", "lcm", *FLAGS)  # a flag counts as the lines' choice
    assert status == 0, err
    assert read_png_metadata(tmp_path / "out2" / "000001-000.png")[1]["params"]["sampler"] == "lcm"


def test_bulk_cfg_start_flag_is_the_lines_default(capsys, tmp_path, model):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"a red circle"\n{"prompt": "a blue square", "cfg_start": 0.1}\n')
    status, _, err = _run(capsys, "generate", "--prompts", prompts, "--out", tmp_path / "out", "--model", model,
                          "--cfg-start", "0.3", *FLAGS)
    assert status == 0, err
    got = [read_png_metadata(tmp_path / "out" / f"00000{n}-000.png")[1]["params"]["cfg_start"] for n in (1, 2)]
    assert got == [0.3, 0.1]
