"""Prompt completion: a rewrite of the prompt that a model's file asks for and the pipeline applies before encoding.

A model trained on captions that always say some things can be asked for them when a prompt leaves them out. The
shapes world is a case: it draws a grey background (plain, gradient or textured) behind every caption that names
none, and guidance pushes such a prompt towards the likeliest background of the training set, plain, in whatever
colour. A model of that world fine-tuned with half of those captions naming their grey ("… on a textured grey
background"; ``data.shapes_grey_named``) draws the world's backgrounds when the prompt is completed the same way
(``estable.training.shapes.captions.name_grey_background``; benchmarks/RESULTS.md, "a word for the unnamed grey").

A completion is the pipeline's doing, not the network's: it is named in the model's file
(``ModelConfig.prompt_completion``, written by ``estable convert --prompt-completion``), it is off for a request
with ``complete_prompt=False`` (``estable generate --no-prompt-completion``), each image's record and infotext hold
the prompt as completed (so the record makes the same image again: a completed prompt completes to itself), and
evaluations report it.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import EstableError


def _shapes_grey_background(text: str, seed: int) -> str:
    from .training.shapes.captions import name_grey_background

    return name_grey_background(text, seed)


# name -> (prompt, image seed) -> prompt; a completion must give back a prompt it has completed unchanged.
COMPLETIONS: dict[str, Callable[[str, int], str]] = {
    # a caption of the shapes world's grammar that names no background gets the grey background its world draws
    # (the kind at the world's odds, 2 : 1 : 1, chosen by the image's seed); any other prompt is left as it is
    "shapes-grey-background": _shapes_grey_background,
}


def check_completion(name: str) -> str:
    """``name`` if it is a known completion; an EstableError that lists them otherwise."""
    if name not in COMPLETIONS:
        raise EstableError(f"unknown prompt completion {name!r}; known: {', '.join(sorted(COMPLETIONS))}")
    return name


def complete_prompt(name: str | None, prompt: str, seed: int) -> str:
    """The prompt image ``seed`` is drawn from under completion ``name`` (None: the prompt itself)."""
    if name is None:
        return prompt
    return COMPLETIONS[check_completion(name)](prompt, seed)
