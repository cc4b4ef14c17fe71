"""estable.training.synonyms and `estable train synonyms` (issue 11's paraphrases): the synonym map, the
distillation on a tiny CPU model (the synonym term falls, the keeping term holds the known captions, only the text
encoder changes) and the command; the compositional benchmark's second paraphrase set."""

from __future__ import annotations

import json

import pytest
import torch

from estable.errors import EstableError
from estable.training import synonyms as syn


def test_parse_and_say_synonyms():
    assert syn.parse_synonyms(["beneath=below", " on top of = above "]) == {"beneath": "below", "on top of": "above"}
    for bad in ("beneath", "=below", "beneath=", "below=below"):
        with pytest.raises(EstableError, match="NEW=KNOWN"):
            syn.parse_synonyms([bad])
    with pytest.raises(EstableError, match="given twice"):
        syn.parse_synonyms(["beneath=below", "beneath=above"])
    table = syn.PARAPHRASE_SYNONYMS
    assert syn.say_with("a red circle below a blue square", table) == "a red circle beneath a blue square"
    assert syn.say_with("a red circle to the left of a blue square on a grey background", table) == \
        "a red circle on the left of a blue square on a grey background"
    # whole words only: "above" inside another word is left alone, and a caption without a known phrase is unchanged
    assert syn.say_with("aboveground red circles", {"over": "above"}) == "aboveground red circles"
    assert not syn.says_known("two red circles", table) and syn.says_known("a red star above a blue star", table)


def test_the_recipes_synonyms_are_the_paraphrase_tests():
    from estable.evaluation.compositional import PARAPHRASES, make_prompts

    plain = [p for p in make_prompts(60) if p.kind == "pair"]
    said = [p for p in make_prompts(60, paraphrased=True) if p.kind == "pair"]
    assert plain and all(syn.say_with(p.caption, syn.PARAPHRASE_SYNONYMS) == q.caption for p, q in zip(plain, said))
    assert len(syn.PARAPHRASE_SYNONYMS) == len(PARAPHRASES)


def _networks(path):
    from estable.checkpoints.store import load_model

    m = load_model(path, dtype="fp32")
    return m, {f"{part}.{k}": v.clone() for part in ("unet", "vae", "text_encoder")
               for k, v in getattr(m, part).state_dict().items()}


def _context(model, texts):
    with torch.no_grad():
        return model.text_encoder.encode(model.tokenizer(texts), model.config.clip_skip)


def test_teach_synonyms_lowers_the_synonym_loss_and_keeps_the_rest(tmp_path):
    """On a tiny model: the held-out synonym term falls; U-Net and VAE are written unchanged; the keeping term holds
    the known captions' contexts much closer than the same run without it does."""
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m")
    common = dict(scenes=24, val_scenes=16, steps=12, batch=8, keep_batch=16, lr=3e-3, device="cpu")
    kept = syn.teach_synonyms(model, tmp_path / "kept.safetensors", {"beneath": "below"}, keep_weight=30.0,
                              work=tmp_path / "w", **common, log=lambda m: None)
    free = syn.teach_synonyms(model, tmp_path / "free.safetensors", {"beneath": "below"}, keep_weight=0.0,
                              **common, log=lambda m: None)
    assert kept["val_after"] < kept["val_before"] and free["val_after"] < free["val_before"]
    assert free["val_before"] == kept["val_before"]  # the same held-out scenes, timesteps and noise
    base_model, base = _networks(model)
    kept_model, after = _networks(tmp_path / "kept.safetensors")
    free_model, _ = _networks(tmp_path / "free.safetensors")
    # OUT is fp16: U-Net and VAE are the source's weights rounded; the text encoder's moved
    assert all(torch.equal(base[k].half().float(), after[k]) for k in base if not k.startswith("text_encoder."))
    te = [k for k in base if k.startswith("text_encoder.")]
    assert sum(not torch.equal(base[k].half().float(), after[k]) for k in te) > len(te) // 2
    known = ["two red circles", "a blue star above a green heart", "a red square to the left of a black cross", ""]
    before = _context(base_model, known)
    drift_kept = (_context(kept_model, known) - before).pow(2).mean()
    drift_free = (_context(free_model, known) - before).pow(2).mean()
    assert drift_kept < drift_free / 3, (drift_kept, drift_free)
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and {"synonym", "keep"} <= set(log[0])
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    assert summary["synonyms"] == {"beneath": "below"} and summary["keep_weight"] == 30.0


def test_the_own_keeping_term_holds_the_known_captions_predictions(tmp_path):
    """keep_own_weight: the U-Net's predictions from the trained pair captions as written stay closer to the
    untaught encoder's than without the term (same steps and draws); its loss is logged."""
    from estable.sampling.schedules import alphas_cumprod
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m")
    common = dict(scenes=24, val_scenes=8, steps=12, batch=8, keep_batch=16, lr=3e-3, keep_weight=0.0,
                  device="cpu", log=lambda m: None)
    own = syn.teach_synonyms(model, tmp_path / "own.safetensors", {"beneath": "below"}, keep_own_weight=30.0,
                             work=tmp_path / "w", **common)
    syn.teach_synonyms(model, tmp_path / "free.safetensors", {"beneath": "below"}, **common)
    assert own["keep_own_weight"] == 30.0
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert all("keep_own" in r for r in log)
    base_model, _ = _networks(model)
    own_model, _ = _networks(tmp_path / "own.safetensors")
    free_model, _ = _networks(tmp_path / "free.safetensors")
    captions = ["a blue star below a green heart", "a red square above a black cross"]
    torch.manual_seed(0)
    z = torch.randn(2, 4, base_model.config.unet.sample_size, base_model.config.unet.sample_size)
    t = torch.tensor([100, 700])
    ac = alphas_cumprod(base_model.config.schedule)
    z_t = (z * ac[t].sqrt()[:, None, None, None]).float()

    def drawn(m):
        with torch.no_grad():
            return base_model.unet(z_t, t, _context(m, captions))

    before = drawn(base_model)
    drift_own = (drawn(own_model) - before).pow(2).mean()
    drift_free = (drawn(free_model) - before).pow(2).mean()
    assert drift_own < drift_free / 2, (drift_own, drift_free)


def test_train_synonyms_command(tmp_path, run):
    from tiny_model import tiny_model_file

    model = tiny_model_file(tmp_path / "m")
    out = tmp_path / "o.safetensors"
    code, text, _ = run("train", "synonyms", str(model), str(out), "--synonym", "beneath=below", "--scenes", "8",
                        "--val-scenes", "4", "--steps", "2", "--batch", "4", "--device", "cpu")
    assert code == 0 and out.is_file() and "held-out synonym loss" in text
    assert (tmp_path / "o.safetensors.work" / "summary.json").is_file()
    code, _, err = run("train", "synonyms", str(model), str(out), "--steps", "1")
    assert code != 0 and "exists" in err
    for bad, says in ((["--synonym", "beneath"], "NEW=KNOWN"), (["--lr", "0"], "--lr must be positive"),
                      (["--scenes", "0"], "--scenes, --val-scenes and --batch"),
                      (["--keep-weight", "-1"], "--keep-weight"), (["--keep-own-weight", "-1"], "--keep-own-weight")):
        code, _, err = run("train", "synonyms", str(model), str(tmp_path / "x.safetensors"), *bad)
        assert code != 0 and says in err, (bad, err)
    code, _, err = run("train", "synonyms", str(model), str(tmp_path / "y.safetensors"), "--synonym", "atop=astride")
    assert code != 0 and "say none of the known phrases" in err
    code, _, err = run("train", "synonyms", str(tmp_path / "missing.safetensors"), str(tmp_path / "z.safetensors"))
    assert code != 0 and "no model at" in err


def test_unseen_paraphrase_set():
    from estable.cli import build_parser
    from estable.evaluation.compositional import UNSEEN_PARAPHRASES, make_prompts, paraphrase, relation_phrase

    plain = [p for p in make_prompts(60) if p.kind == "pair"]
    unseen = [p for p in make_prompts(60, paraphrased="unseen") if p.kind == "pair"]
    assert [p.spec for p in unseen] == [p.spec for p in plain]
    for p, q in zip(plain, unseen):
        phrase = next(k for k in UNSEEN_PARAPHRASES if k in p.caption)
        assert q.caption == p.caption.replace(phrase, UNSEEN_PARAPHRASES[phrase])
        assert relation_phrase(q.caption) == UNSEEN_PARAPHRASES[phrase].strip()
    assert relation_phrase("a red circle on the left of a blue square") == "on the left of"
    with pytest.raises(ValueError, match="paraphrase set"):
        paraphrase("a red circle above a blue square", "other")
    with pytest.raises(ValueError, match="paraphrase set"):
        make_prompts(10, paraphrased="other")
    parser = build_parser()
    base = ["eval", "compositional", "--model", "m.safetensors"]
    assert parser.parse_args([*base, "--paraphrase"]).paraphrase == "synonyms"
    assert parser.parse_args([*base, "--paraphrase", "unseen"]).paraphrase == "unseen"
    assert parser.parse_args(base).paraphrase is None
