"""Fréchet distance: closed-form cases, an independent implementation, sampling convergence, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from estable.evaluation.fid import compute_fid, feature_stats, frechet_distance, pil_to_tensor, trace_sqrt_product


def _random_spd(rng: np.random.Generator, d: int, cond: float = 10.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    vals = np.exp(rng.uniform(0, math.log(cond), d))
    return (q * vals) @ q.T


def _independent_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """A differently written FID: numpy, the NON-symmetric product Σ1Σ2 and its general eigenvalues.

    Tr(sqrtm(Σ1Σ2)) is the sum of the square roots of the eigenvalues of Σ1Σ2 (real, ≥ 0); scipy's sqrtm is used
    instead when scipy is installed (it is what pytorch-fid uses).
    """
    try:
        from scipy import linalg

        tr_sqrt = float(np.real(np.trace(linalg.sqrtm(s1 @ s2))))
    except ImportError:
        ev = np.linalg.eigvals(s1 @ s2)
        assert np.abs(ev.imag).max() < 1e-8 * max(1.0, np.abs(ev.real).max())
        tr_sqrt = float(np.sqrt(np.clip(ev.real, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_diagonal_closed_form() -> None:
    # Commuting (diagonal) covariances: d² = |μ1−μ2|² + Σ_i (√a_i − √b_i)².
    a = np.array([1.0, 4.0, 0.25, 9.0, 2.0])
    b = np.array([2.0, 1.0, 0.25, 16.0, 0.5])
    mu1 = np.array([0.0, 1.0, -2.0, 0.5, 3.0])
    mu2 = np.array([1.0, 1.0, 0.0, 0.5, -1.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_two_by_two_closed_form_non_commuting() -> None:
    # For a 2×2 matrix A with eigenvalues λ1, λ2 ≥ 0: (√λ1 + √λ2)² = tr A + 2√det A, so
    # Tr(A^{1/2}) = sqrt(tr A + 2 sqrt(det A)) — an exact closed form for non-commuting 2×2 covariances.
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    a = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(a) + 2 * math.sqrt(np.linalg.det(a)))
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("d", [3, 16, 64])
def test_matches_independent_implementation(d: int) -> None:
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(rng, d, 50.0), _random_spd(rng, d, 50.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = _independent_fid(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_rank_deficient_covariances() -> None:
    # Fewer samples than dimensions (singular Σ): the eigenvalue clamp keeps the result finite and correct.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 12))
    y = rng.standard_normal((7, 12)) * 2 + 1
    m1, s1 = feature_stats(x)
    m2, s2 = feature_stats(y)
    got = frechet_distance(m1, s1, m2, s2)
    want = _independent_fid(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert math.isfinite(got)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_identical_sets_give_zero() -> None:
    rng = np.random.default_rng(2)
    f = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # Tr((ΣΣ)^{1/2}) = Tr Σ exactly for a PSD Σ.
    assert float(trace_sqrt_product(sigma, sigma)) == pytest.approx(float(torch.trace(sigma)), rel=1e-10)


def test_feature_stats_match_numpy() -> None:
    f = np.random.default_rng(3).standard_normal((40, 6))
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu.numpy(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), rtol=1e-12)


def test_invariances() -> None:
    rng = np.random.default_rng(4)
    d = 8
    x = rng.standard_normal((300, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 0.5
    base = frechet_distance(*feature_stats(x), *feature_stats(y))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    shift = rng.standard_normal(d) * 3
    # Same rotation and translation of both sets: the distance does not change.
    moved = frechet_distance(*feature_stats(x @ q + shift), *feature_stats(y @ q + shift))
    assert moved == pytest.approx(base, rel=1e-9)
    # Symmetric in its arguments.
    assert frechet_distance(*feature_stats(y), *feature_stats(x)) == pytest.approx(base, rel=1e-9)
    # Scaling all features by c scales d² by c².
    assert frechet_distance(*feature_stats(3 * x), *feature_stats(3 * y)) == pytest.approx(9 * base, rel=1e-9)


def test_sample_estimate_converges_to_analytic_value() -> None:
    rng = np.random.default_rng(5)
    d = 4
    s1, s2 = _random_spd(rng, d, 5.0), _random_spd(rng, d, 5.0)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    true = frechet_distance(mu1, s1, mu2, s2)
    l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
    errors = []
    for n in (100, 1000, 100_000):
        err = []
        for rep in range(4):
            r = np.random.default_rng(100 * n + rep)
            x = r.standard_normal((n, d)) @ l1.T + mu1
            y = r.standard_normal((n, d)) @ l2.T + mu2
            err.append(abs(frechet_distance(*feature_stats(x), *feature_stats(y)) - true))
        errors.append(float(np.mean(err)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * true + 0.01  # 100k samples per set: within 1 % (measured ≈ 0.1 %)


def test_compute_fid_on_images_with_a_fixed_extractor() -> None:
    # Mean colour as the "feature": FID of two image sets equals the Fréchet distance of their colour statistics.
    rng = np.random.default_rng(6)

    def images(mean: float, n: int) -> list[Image.Image]:
        return [Image.new("RGB", (8, 8), tuple(int(v) for v in np.clip(rng.normal(mean, 20, 3), 0, 255)))
                for _ in range(n)]

    a, b = images(100, 50), images(140, 50)

    def extractor(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 3)

    got = compute_fid(a, b, extractor, batch_size=16)
    fa, fb = pil_to_tensor(a).mean((2, 3)), pil_to_tensor(b).mean((2, 3))  # (N, 3) mean colours
    want = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    assert got == pytest.approx(want, rel=1e-9)
    assert got > 0.05  # mean colours 40 grey levels apart ⇒ about 3 · (40/255)² ≈ 0.07
    assert compute_fid(a, a, extractor, batch_size=7) == pytest.approx(0.0, abs=1e-9)


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------------------
# Inception-v3 (architecture only: the real weight file is the user's, never downloaded here)
# ---------------------------------------------------------------------------------------------------------


def test_inception_loads_a_state_dict_file_and_gives_pool3(tmp_path) -> None:
    from estable.evaluation.inception import FIDInceptionV3, InceptionFeatures

    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    state = model.state_dict()
    # torchvision names, as in pytorch-fid's file: spot-check a few keys and shapes.
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "pt_inception.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    feats = InceptionFeatures(path)
    x = torch.rand(2, 3, 64, 64)
    out = feats(x)
    assert out.shape == (2, 2048)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_inception_fid_pooling_quirks() -> None:
    from estable.evaluation.inception import InceptionA, InceptionE

    torch.manual_seed(0)
    e_avg, e_max = InceptionE(8, pool="avg").eval(), InceptionE(8, pool="max").eval()
    e_max.load_state_dict(e_avg.state_dict())
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        ya, ym = e_avg(x), e_max(x)
    assert ya.shape == (1, 2048, 5, 5)
    torch.testing.assert_close(ya[:, :-192], ym[:, :-192])  # only the pool branch differs
    assert not torch.allclose(ya[:, -192:], ym[:, -192:])
    # The average pool ignores padding: a constant input stays constant at the border after pooling.
    block = InceptionA(4, pool_features=4).eval()
    with torch.no_grad():
        block.branch_pool.conv.weight.fill_(1.0)
        y = block(torch.ones(1, 4, 6, 6))[:, -4:]
    torch.testing.assert_close(y[..., 0, 0], y[..., 3, 3])


def _torch_fidelity_inception():
    """torch-fidelity's FID Inception module (its own pure-torch port of the TensorFlow 2015-12-05 graph, "adapted
    from pytorch-fid"), imported without running the package's __init__, which imports torchvision (not importable
    beside this torch build). Install it with ``pip install --no-deps torch-fidelity==0.4.0``."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    if "torch_fidelity" not in sys.modules:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def test_inception_matches_an_independent_fid_inception_on_random_weights(tmp_path) -> None:
    """The same random weights (BatchNorm statistics too) in our FIDInceptionV3 and in torch-fidelity's FID
    Inception: the state dicts load into each other strictly (same layers, names and shapes), and the pool3
    features of the same 299x299 images agree. torch-fidelity takes uint8 pixels u and scales (u - 128) / 128; ours
    takes x in [0, 1] and scales 2x - 1, so x = u / 256 is the same input."""
    from estable.evaluation.inception import FIDInceptionV3

    fidelity = _torch_fidelity_inception()
    torch.manual_seed(0)
    ours = FIDInceptionV3()
    # Random weights that keep the signal: with PyTorch's default initialisation the activations fade over the 40+
    # layers and the features no longer depend on the image (seen: 4e-9 apart for two random images), which would
    # hide a wrong input scaling. He-normal convolutions, random BatchNorm affines, and BatchNorm statistics taken
    # from one batch of random images.
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.momentum = 1.0
        ours.train()(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(2)))
    ours.eval()
    path = tmp_path / "random_inception.pth"
    torch.save(ours.state_dict(), path)
    theirs = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                  feature_extractor_weights_path=str(path))
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        (expected,) = theirs(u)
        got = ours(u.float() / 256.0)
    assert expected.shape == got.shape == (2, 2048)
    assert float((expected[0] - expected[1]).abs().mean()) > 0.05 * float(expected.abs().mean())  # image-dependent
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The resize to 299 (pytorch-fid: bilinear, align_corners=False; torch-fidelity resizes as TensorFlow 1 did, so
    # it is not the oracle here): halving 598 -> 299 that way samples at 2i + 0.5, the mean of each 2x2 block.
    big = torch.rand(1, 3, 598, 598, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(big), ours(torch.nn.functional.avg_pool2d(big, 2)), rtol=1e-4, atol=1e-5)


def test_inception_needs_a_weight_file(tmp_path) -> None:
    from estable.errors import CheckpointError, EstableError
    from estable.evaluation.inception import load_fid_inception

    with pytest.raises(EstableError, match="--inception-weights"):
        load_fid_inception(None)
    with pytest.raises(EstableError, match="--inception-weights"):
        load_fid_inception(tmp_path / "absent.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(CheckpointError, match="not pytorch-fid"):
        load_fid_inception(wrong)


class _Touch:  # a pickle that would run code when loaded unsafely
    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_an_inception_file_holding_code_is_refused_on_one_line(tmp_path) -> None:
    from estable.errors import CheckpointError
    from estable.evaluation.inception import load_fid_inception

    evil, marker = tmp_path / "pt_inception.pth", tmp_path / "pwned"
    torch.save({"w": _Touch(marker)}, evil)
    with pytest.raises(CheckpointError, match="could not be loaded safely") as info:
        load_fid_inception(evil)
    assert "\n" not in str(info.value) and "weights_only` set to `False`" not in str(info.value)
    assert not marker.exists()


def test_cli_fid_on_real_renders(tmp_path, capsys) -> None:
    import argparse
    import json

    from estable.cli_eval import add_eval_commands
    from estable.evaluation.judge import Judge, JudgeConfig, save_judge

    torch.manual_seed(0)
    judge_file = save_judge(Judge(JudgeConfig(64, (8, 16, 16, 16))), tmp_path / "judge.safetensors")
    parser = argparse.ArgumentParser()
    add_eval_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "fid.json"
    args = parser.parse_args(["eval", "fid", "--real", "shapes:24", "--fake", "shapes:24", "--judge", str(judge_file),
                              "--size", "64", "--device", "cpu", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["n_real"] == result["n_fake"] == 24
    assert result["fid"] > 0 and result["floor"] > 0
    assert "floor" in capsys.readouterr().out
