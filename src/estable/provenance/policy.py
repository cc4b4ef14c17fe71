"""One generation policy for every door an image leaves by: the prompt filter, the marks, the output check, the
signature.

    policy = ProvenancePolicy.configure(blocklists=["words.txt"], sign_key="key.pem")   # files read, checked
    policy.check_prompt(prompt)              # PromptRefused (an EstableError) for a blocked prompt; logged
    policy.prepare(pipe, "txt2img")          # the Tree-Ring key into the initial noise, when on
    result, refused = policy.stamp(result, pipe)   # output check (refused images leave), watermark, record, signature

The CLI (``estable generate``, through :class:`estable.cli_provenance.GenerationProvenance`) and the server
(``estable serve``) both build one of these from the same options, so an image gets the same filter, the same
marks and the same record whichever door it left by.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from estable.errors import EstableError

from .filters import Blocklist, check_prompt, load_blocklist

__all__ = ["WATERMARK_KEY_ENV", "ProvenancePolicy"]

WATERMARK_KEY_ENV = "ESTABLE_WATERMARK_KEY"


@dataclass
class ProvenancePolicy:
    settings: Any = None  # WatermarkSettings (default: the DWT watermark on, no key, no Tree-Ring)
    signing_key: Any = None  # an Ed25519 private key
    output_check: Any = None  # estable.provenance.output_check.OutputCheck
    blocklists: list[Blocklist] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.settings is None:
            from .watermark import WatermarkSettings

            self.settings = WatermarkSettings()

    @classmethod
    def configure(cls, *, watermark: bool = True, watermark_key: str | None = None, tree_ring: bool = False,
                  sign_key: str | os.PathLike | None = None, blocklists: Sequence[str | os.PathLike] = (),
                  output_check: str | os.PathLike | None = None, output_clip: str | os.PathLike | None = None,
                  output_threshold: float | None = None) -> ProvenancePolicy:
        """The policy of these options (the CLI's flags of the same names), every file read and checked now.

        ``watermark_key`` None takes ``$ESTABLE_WATERMARK_KEY``; ``sign_key`` None takes ``$ESTABLE_SIGN_KEY``;
        ``output_threshold`` None is the output check's default, 30."""
        from .records import SIGN_KEY_ENV, load_private_key
        from .watermark import WatermarkSettings

        lists = [load_blocklist(f) for f in blocklists]
        key = watermark_key if watermark_key is not None else os.environ.get(WATERMARK_KEY_ENV) or None
        settings = WatermarkSettings(dwtdct=bool(watermark), key=key, tree_ring=bool(tree_ring))
        key_path = sign_key or os.environ.get(SIGN_KEY_ENV) or None
        check = None
        if output_check:
            from .output_check import OutputCheck

            if not output_clip:
                raise EstableError("--output-check needs --output-clip CLIP (a CLIP pair file; the built-in model "
                                   "ships only its text tower)")
            check = OutputCheck.load(output_clip, output_check, 30.0 if output_threshold is None else output_threshold)
        elif output_clip or output_threshold is not None:  # a threshold alone would look like a check that is on
            flag = "--output-clip" if output_clip else "--output-threshold"
            raise EstableError(f"{flag} is used by --output-check FILE, which is missing")
        return cls(settings, load_private_key(key_path) if key_path else None, check, lists)

    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`~estable.provenance.filters.PromptRefused` (and log it) for a blocked prompt. Only the
        prompt is filtered, not the negative prompt (which legitimately names what to avoid)."""
        if self.blocklists:
            check_prompt(prompt, self.blocklists)

    def for_mode(self, mode: str) -> ProvenancePolicy:
        """This policy for a generation in ``mode``: the Tree-Ring key marks text-to-image only, so for img2img and
        inpainting it is left out (and the records say so)."""
        if mode == "txt2img" or not self.settings.tree_ring:
            return self
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, tree_ring=False))

    def prepare(self, pipe: Any, mode: str) -> None:
        from .stamp import prepare

        prepare(pipe, self.settings, mode)

    def stamp(self, result: Any, pipe: Any) -> tuple[Any, list[str]]:
        """The output check (refused images leave the result), then the marks, records and signatures of the rest.
        Returns the result and one line per refused image."""
        from .stamp import stamp

        refused: list[str] = []
        if self.output_check is not None:
            verdicts = self.output_check.check(result.images)
            keep = [k for k, v in enumerate(verdicts) if v is None]
            for k, v in enumerate(verdicts):
                if v is not None:
                    refused.append(f"image {k} (seed {result.seeds[k]}): concept {v[0]!r}, score {v[1]:.1f}")
            result = dataclasses.replace(
                result, images=[result.images[k] for k in keep], seeds=[result.seeds[k] for k in keep],
                infotexts=[result.infotexts[k] for k in keep], records=[result.records[k] for k in keep])
        return stamp(result, pipe, self.settings, signing_key=self.signing_key), refused

    @staticmethod
    def refusal_message(refused: Sequence[str]) -> str:
        return (f"the output check refused {len(refused)} image(s), not written: " + "; ".join(refused))
