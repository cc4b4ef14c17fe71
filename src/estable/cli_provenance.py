"""The provenance side of ``estable``: watermark, signing and filter flags of the generation commands, and the
``verify`` and ``keys`` commands. The logic lives in :mod:`estable.provenance`; this is the shell.

Wire-up: ``add_generation_flags(p)`` on each generation parser; in the command, ``GenerationProvenance.from_args``
before the model is loaded (checks the prompt, loads the signing key), ``.prepare(pipe, mode)`` before
generating and ``.stamp(result, pipe)`` before saving. ``add_provenance_commands(sub)`` adds the commands.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import EstableError
from .provenance.policy import WATERMARK_KEY_ENV

__all__ = ["GenerationProvenance", "add_generation_flags", "add_provenance_commands"]


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("provenance and filters")
    g.add_argument("--no-watermark", dest="watermark", action="store_false", default=True,
                   help="do not write the invisible DWT watermark into the pixels (the record says so)")
    g.add_argument("--watermark-key", metavar="TEXT",
                   help=f"a per-user key whose 4-byte tag goes into the watermark (default: ${WATERMARK_KEY_ENV})")
    g.add_argument("--tree-ring", action="store_const", const=True, default=None,
                   help="write Estable's Tree-Ring key into the initial noise (text-to-image only; detected by "
                   "`estable verify` through DDIM inversion)")
    g.add_argument("--sign-key", metavar="PEM",
                   help="sign each image's record with this Ed25519 private key (default: $ESTABLE_SIGN_KEY; "
                   "make one with `estable keys new`)")
    g.add_argument("--blocklist", metavar="FILE", action="append",
                   help="refuse prompts containing a term of FILE (one term per line; repeatable)")
    g.add_argument("--output-check", metavar="FILE",
                   help="refuse images whose CLIP embedding matches a concept prompt of FILE (one per line) with a "
                   "score ≥ --output-threshold; refused images are not written (needs --output-clip)")
    g.add_argument("--output-clip", metavar="CLIP",
                   help="the CLIP pair for --output-check (an Estable clip.safetensors or `estable train clip` run)")
    g.add_argument("--output-threshold", type=float, default=None, metavar="F",
                   help="CLIP score (100·cos) at which --output-check refuses an image (default 30)")


@dataclass
class GenerationProvenance:
    """The CLI's side of :class:`estable.provenance.policy.ProvenancePolicy` (which holds the logic, shared with
    the server): the policy from the flags, and the refusals of a run collected for :meth:`finish`."""

    policy: Any  # ProvenancePolicy
    refused: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Any:
        return self.policy.settings

    @property
    def signing_key(self) -> Any:
        return self.policy.signing_key

    @property
    def output_check(self) -> Any:
        return self.policy.output_check

    @classmethod
    def from_args(cls, args: argparse.Namespace, prompt: str, record: dict[str, Any] | None = None
                  ) -> GenerationProvenance:
        """Check the prompt against the blocklists and resolve the settings; fails before the model loads."""
        from .provenance.policy import ProvenancePolicy
        from .provenance.stamp import settings_from_record

        tree_ring = args.tree_ring
        if tree_ring is None:  # --from-png: keep the Tree-Ring of the image being re-made
            tree_ring = record is not None and getattr(args, "mode", "txt2img") == "txt2img" and \
                settings_from_record(record)[0].tree_ring
        policy = ProvenancePolicy.configure(
            watermark=args.watermark, watermark_key=args.watermark_key, tree_ring=bool(tree_ring),
            sign_key=args.sign_key, blocklists=getattr(args, "blocklist", None) or (),
            output_check=getattr(args, "output_check", None), output_clip=getattr(args, "output_clip", None),
            output_threshold=getattr(args, "output_threshold", None))
        policy.check_prompt(prompt)
        return cls(policy)

    def prepare(self, pipe: Any, mode: str) -> None:
        self.policy.prepare(pipe, mode)

    def stamp(self, result: Any, pipe: Any) -> Any:
        """The output check (refused images leave the result), then the marks, records and signatures."""
        result, refused = self.policy.stamp(result, pipe)
        self.refused.extend(refused)
        return result

    def finish(self) -> None:
        """After the allowed images are written: the output check's refusals as one error."""
        if self.refused:
            raise EstableError(self.policy.refusal_message(self.refused))


# ------------------------------------------------------------------------------------------------- commands


def add_provenance_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="look for Estable's watermarks in images and check their records",
        description="For each IMAGE: read the DWT watermark (bits recovered, p-value), test for the Tree-Ring key "
        "by DDIM inversion with --model (p-value), show the noise-residue detector's P(generated) (informative "
        "only), and check the Estable record (pixel hash, signature). "
        "Exit status 0 when every image carries an Estable watermark, 1 when one does not, 2 on an error. "
        "With --reproduce, re-make each image from its record instead and compare the pixels (exit 0 only "
        "when bit-exact, with an intact record and no invalid signature).",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, …)")
    p.add_argument("--key", metavar="TEXT", help="a watermark key: also report whether the image carries its tag")
    p.add_argument("--model", metavar="SRC",
                   help="model for the Tree-Ring inversion and for --reproduce (default: the built-in model; "
                   "with --reproduce, the record's model when it is there)")
    p.add_argument("--no-tree-ring", dest="tree_ring", action="store_false",
                   help="skip the Tree-Ring test (it loads a model and runs the inversion: about a second per "
                   "image on a CPU for the built-in model)")
    p.add_argument("--steps", type=int, default=50, metavar="N", help="DDIM inversion steps (default 50)")
    p.add_argument("--reproduce", action="store_true",
                   help="re-make each image from its record and report bit-exactness or the difference")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where to run the model (default: the record's device type for --reproduce, else auto)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
                   help="model precision (default: the record's for --reproduce, else auto)")
    p.add_argument("--json", action="store_true", help="print one JSON report per image")
    p.set_defaults(func=_cmd_verify)

    d = sub.add_parser(
        "detect", help="estimate whether images were generated, from their noise residue",
        description="Print P(generated) for each IMAGE from the spectrum of its noise residue (a small CNN). "
        "The shipped detector was trained on the built-in model's images against shapes-world renders only: "
        "for other models, photographs or heavily recompressed images its answer is a guess "
        "(benchmarks/RESULTS.md holds its measured accuracy).")
    d.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    d.add_argument("--weights", metavar="FILE", help="detector weights (default: the shipped detector)")
    d.add_argument("--json", action="store_true", help="one JSON object per image")
    d.set_defaults(func=_cmd_detect)

    k = sub.add_parser("keys", help="manage signing keys", description="Manage Ed25519 signing keys.")
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    n = ks.add_parser("new", help="make a new Ed25519 key pair",
                      description="Write estable_ed25519.pem (private, owner-only) and estable_ed25519.pub.pem into "
                      "DIR. Sign with `estable generate --sign-key DIR/estable_ed25519.pem …` or by setting "
                      "ESTABLE_SIGN_KEY. Needs the 'cryptography' package (pip install 'estable[provenance]').")
    n.add_argument("--out", metavar="DIR", default=".", help="folder to write the key pair into (default .)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    n.set_defaults(func=_cmd_keys_new)


def _cmd_detect(args: argparse.Namespace) -> int:
    from .images import load_image
    from .provenance.detector import DEFAULT_WEIGHTS, load_detector

    model = load_detector(args.weights or DEFAULT_WEIGHTS)
    for path in args.images:
        p = model.probability([load_image(path)])[0]
        if args.json:
            print(json.dumps({"path": path, "p_generated": p}))
        else:
            print(f"{path}: P(generated) = {p:.3f}")
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from .provenance.records import new_keypair

    private, public, hexkey = new_keypair(args.out, overwrite=args.overwrite)
    print(f"private key: {private}")
    print(f"public key:  {public}")
    print(f"public key (hex, as records show it): {hexkey}")
    return 0


def _loader(args: argparse.Namespace):
    cache: dict[str, Any] = {}

    def load() -> Any:
        if "pipe" not in cache:
            from .pipeline import load_pipeline

            cache["pipe"] = load_pipeline(args.model or "default", device=args.device or "auto",
                                          dtype=args.dtype or "auto")
        return cache["pipe"]

    return load


def _p(p: float) -> str:
    return "< 1e-300" if p <= 0 else f"{p:.3g}"


def _cmd_verify(args: argparse.Namespace) -> int:
    if not 2 <= args.steps <= 1000:
        raise EstableError(f"--steps must be from 2 to 1000 (the schedule's length), not {args.steps}")
    if args.key is not None and not args.key:
        raise EstableError("--key is empty; give the watermark key's text, or leave --key out")
    if args.reproduce:
        return _verify_reproduce(args)
    from .provenance.verify import check_image

    load = _loader(args) if args.tree_ring else None
    everywhere = True
    for path in args.images:
        report = check_image(path, key=args.key, pipe=load, steps=args.steps)
        everywhere = everywhere and report["found"]
        if args.json:
            print(json.dumps(report, default=_json_default))
            continue
        print(path)
        d = report["dwtdct"]
        if d.get("note"):
            print(f"  dwtDct watermark: not readable ({d['note']})")
        else:
            tag = f", key tag {d['tag']}" if d["found"] else ""
            if d["key_matches"] is not None:
                tag += " (matches --key)" if d["key_matches"] else " (not --key's tag)"
            print(f"  dwtDct watermark: {'FOUND' if d['found'] else 'not found'}, {d['mark_bits']}/32 mark bits "
                  f"(p = {_p(d['p_value'])}){tag}; bits read {d['message']}")
        t = report.get("tree_ring")
        if t is not None:
            if "p_value" in t:
                print(f"  Tree-Ring: {'FOUND' if t['found'] else 'not found'}, p = {_p(t['p_value'])} (inverted "
                      f"with {t['model']}, {t['steps']} DDIM steps)")
            else:
                print(f"  Tree-Ring: not tested ({t.get('note')})")
        residue = report.get("residue_detector")
        if residue is not None and residue["p_generated"] is None:
            print(f"  noise-residue detector: not run ({residue['note']})")
        elif residue is not None:
            print(f"  noise-residue detector: P(generated) = {residue['p_generated']:.3f} "
                  "(knows the built-in model's images and shapes renders only)")
        r = report["record"]
        if not r["present"]:
            print("  record: none")
        else:
            pixels = {"match": "pixels match its SHA-256", "edited": "PIXELS EDITED (SHA-256 mismatch)",
                      "no hash": "no pixel hash"}[r["pixels"]]
            sig = {"valid": f"signature valid (ed25519 key {r['signature_detail']})", "unsigned": "unsigned",
                   "invalid": f"SIGNATURE INVALID: {r['signature_detail']}"}[r["signature"]]
            print(f"  record: {pixels}; {sig}")
        print(f"  verdict: {'Estable watermark found' if report['found'] else 'no Estable watermark found'}")
    return 0 if everywhere else 1


def _verify_reproduce(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline import load_pipeline
    from .provenance.verify import reproduce

    def load(record: dict[str, Any]) -> Any:
        src = args.model
        if src is None:
            recorded = (record.get("model") or {}).get("source")
            src = recorded if recorded and Path(recorded).exists() else "default"
        dev = args.device or (record.get("device") or {}).get("type") or "auto"
        if dev == "cuda":
            import torch

            if not torch.cuda.is_available():
                dev = "cpu"
        dtype = args.dtype or {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(
            (record.get("device") or {}).get("dtype", ""), "auto")
        return load_pipeline(src, device=dev, dtype=dtype)

    ok_all = True
    for path in args.images:
        rep = reproduce(path, load)
        f, rec = rep["file"], rep["record"]
        ok = f["bit_exact"] and rec.get("pixels") != "edited" and rec.get("signature") != "invalid"
        ok_all = ok_all and ok
        if args.json:
            print(json.dumps(rep, default=_json_default))
            continue
        print(path)
        now, then = rep["device"]["now"], rep["device"]["recorded"] or {}
        print(f"  re-made with {rep['model']['used']} on {now['type']} ({now['name']}, {now['dtype']}); recorded: "
              f"{then.get('type', '?')} ({then.get('name', '?')}, {then.get('dtype', '?')})")
        if rep["model"]["sha256_matches"] is False:
            print("  model: NOT the recorded model (SHA-256 differs)")
        if f["bit_exact"]:
            print("  pixels: BIT-EXACT")
        elif "note" in f:
            print(f"  pixels: differ ({f['note']})")
        else:
            print(f"  pixels: differ: max |Δ| {f['max_abs_diff']}/255, mean |Δ| {f['mean_abs_diff']:.4f}, "
                  f"{100 * f['pixels_differing']:.2f} % of pixels, PSNR {f['psnr_db']:.2f} dB")
        if rec.get("pixels") == "edited":
            again = "the re-made image has the recorded pixels" if rep["record_hash"] else "the re-made image " \
                "differs from the recorded pixels too"
            print(f"  record: PIXELS EDITED since the record was written (SHA-256 mismatch); {again}")
        sig = rec.get("signature")
        if sig == "invalid":
            print(f"  signature: INVALID: {rec['signature_detail']}")
        elif sig == "valid":
            print(f"  signature: valid (ed25519 key {rec['signature_detail']})")
        else:
            print("  signature: unsigned")
    return 0 if ok_all else 1


def _json_default(o: Any) -> Any:
    return str(o)
