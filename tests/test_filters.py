"""The prompt filter: adversarial spellings are refused, ordinary words that contain blocked letters are not."""

from __future__ import annotations

import logging

import pytest

from estable.cli import main
from estable.errors import EstableError
from estable.provenance.filters import Blocklist, PromptRefused, check_prompt, load_blocklist, normalize

TERMS = ["ass", "cunt", "kill", "nude", "blood bath", "gore"]


@pytest.fixture(scope="module")
def bl() -> Blocklist:
    return Blocklist.from_terms(TERMS, source="test")


@pytest.mark.parametrize("prompt, term", [
    ("a NUDE figure", "nude"),
    ("a nüdé figure", "nude"),  # diacritics
    ("a n\u0075\u0308de figure", "nude"),  # combining diaeresis
    ("a nu\u200bde figure", "nude"),  # zero-width space
    ("a n\u00adude figure", "nude"),  # soft hyphen
    ("a nu\ufeffde figure", "nude"),  # BOM
    ("a nud\u0435 figure", "nude"),  # Cyrillic е
    ("a ｎｕｄｅ figure", "nude"),  # full-width
    ("a 𝐧𝐮𝐝𝐞 figure", "nude"),  # mathematical bold
    ("a nυde figure", "nude"),  # Greek upsilon
    ("a n00d3 figure", None),  # "nood e": a different word, passes (documented: paraphrases pass)
    ("a nud3 figure", "nude"),  # leetspeak
    ("a k1ll scene", "kill"),
    ("a ki|| scene", "kill"),
    ("a k!ll scene", "kill"),
    ("@$$ shot", "ass"),
    ("a n u d e figure", "nude"),  # inserted spaces
    ("a n.u.d.e figure", "nude"),  # inserted punctuation
    ("a n-u_d*e figure", "nude"),
    ("a nu de figure", "nude"),
    ("a k i l l i n g", "kill"),  # any blocked word inside a run of spaced letters
    ("a kiiiill scene", "kill"),  # stretched letters
    ("nudes on a beach", "nude"),  # plural
    ("a BLOOD   Bath", "blood bath"),  # phrase
    ("a bloodbath", "blood bath"),
    ("a b100d-b4th", "blood bath"),
    ("G0RE", "gore"),
])
def test_adversarial_spellings(bl, prompt, term):
    assert bl.match(prompt) == term


@pytest.mark.parametrize("prompt", [
    "a class of students in Scunthorpe",
    "assess the glass passage, classic bass",
    "a skilled killdeer bird",  # contains "kill"
    "cocktail at the Essex sussex assembly",
    "a gorgeous sunset over Gorey",  # contains "gore"
    "a blood orange in a bath tub",  # the phrase's words apart
    "nudibranch underwater photo",
    "Hello, world! 4k, 8k, ultra detailed, 1girl",
    "a red circle left of a blue square",
])
def test_ordinary_prompts_pass(bl, prompt):
    assert bl.match(prompt) is None


def test_check_prompt_refuses_and_logs(bl, caplog):
    with caplog.at_level(logging.WARNING, logger="estable.filters"), \
            pytest.raises(PromptRefused, match="blocked term 'nude' \\(test\\)"):
        check_prompt("a nüde", [bl])
    assert "prompt refused" in caplog.text and "nude" in caplog.text
    check_prompt("a class", bl)  # no error
    check_prompt("anything", None)
    assert issubclass(PromptRefused, EstableError)


def test_normalize():
    assert normalize("ＡＢ\u200bÇ") == "abc"
    assert normalize("L1|!") == "iiii"


def test_load_blocklist(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("# comment\n\nnude  # trailing comment\nblood bath\n", encoding="utf-8")
    bl = load_blocklist(f)
    assert bl.match("n u d e") == "nude" and bl.match("bloodbath") == "blood bath"
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(EstableError, match="holds no terms"):
        load_blocklist(tmp_path / "empty.txt")
    with pytest.raises(EstableError, match="not found"):
        load_blocklist(tmp_path / "missing.txt")


def test_cli_refuses_before_loading_the_model(tmp_path, capsys):
    f = tmp_path / "list.txt"
    f.write_text("nude\n", encoding="utf-8")
    # the model path does not exist: a refusal must come first, so the error is the refusal
    assert main(["generate", "a n.u.d.e", "--blocklist", str(f), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "prompt was refused" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))
