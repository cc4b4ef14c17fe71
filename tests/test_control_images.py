"""Control images without downloaded weights: Canny against OpenCV's (a test-time oracle), scribbles, line drawings
and the shapes world's colour segmentation; the ``estable control-image`` command."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import estable.cli as cli
from estable.control.preprocess import canny, canny_mask, colour_segmentation, lines, make_control_image, scribble
from estable.errors import EstableError
from estable.training.shapes import BACKGROUND_COLOURS, COLOURS, ShapesWorld

cv2 = pytest.importorskip("cv2")


def _noisy_picture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128]
    a = np.stack([x * 1.5, y * 2, (x + y)], -1) % 256
    a[20:60, 30:90] = [250, 20, 20]
    a[np.hypot(y - 70, x - 100) < 18] = [20, 200, 40]
    return np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    if not a.any() and not b.any():
        return 1.0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(("low", "high"), [(100, 200), (50, 150), (200, 400)])
def test_canny_agrees_with_opencv(low, high):
    pictures = [_noisy_picture(), np.asarray(ShapesWorld(seed=3, size=96).sample(5)[0])]
    for img in pictures:
        ours = canny_mask(Image.fromarray(img), low, high)
        ref = cv2.Canny(img, low, high) > 0
        assert ref.sum() > 40
        assert _f1(ours, ref) > 0.98, (low, high)
    # grey input: the same as OpenCV on the grey image
    grey = np.asarray(Image.fromarray(pictures[0]).convert("L"))
    assert _f1(canny_mask(Image.fromarray(grey), low, high), cv2.Canny(grey, low, high) > 0) > 0.98


def test_gaussian_matches_opencv():
    from estable.control.preprocess import _gaussian

    a = _noisy_picture().astype(np.float32)
    for sigma in (0.8, 1.0, 2.0):
        k = 2 * int(np.ceil(3 * sigma)) + 1  # the same radius, ⌈3σ⌉
        ref = cv2.GaussianBlur(a, (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(_gaussian(a, sigma) - ref).max() < 1e-3, sigma


def test_canny_image_and_thresholds():
    img = Image.fromarray(_noisy_picture())
    out = np.asarray(canny(img))
    assert out.shape == (96, 128, 3) and set(np.unique(out)) == {0, 255}
    assert (out[..., 0] == out[..., 1]).all()
    # raising the thresholds removes edges, never adds them
    assert canny_mask(img, 200, 400).sum() < canny_mask(img, 100, 200).sum()
    smoothed = canny_mask(img, 30, 60, sigma=1.5)
    assert smoothed.sum() < 0.7 * canny_mask(img, 30, 60).sum()  # noise edges gone
    with pytest.raises(EstableError, match="low ≤ high"):
        canny(img, 200, 100)


def test_scribble_and_lines():
    img = Image.fromarray(np.asarray(ShapesWorld(seed=1, size=128).sample(2)[0]))
    s = np.asarray(scribble(img, thickness=5))[..., 0] > 0
    thin = np.asarray(scribble(img, thickness=1))[..., 0] > 0
    assert thin.sum() > 50 and s.sum() > 2 * thin.sum() and (s | thin).sum() == s.sum()  # thickened, same strokes
    drawing = np.full((40, 40), 255, np.uint8)
    drawing[10, 5:35] = 0
    drawing[5:35, 20] = 30
    out = np.asarray(lines(Image.fromarray(drawing)))[..., 0]
    assert out[10, 5:35].min() == 255 and out[5:35, 20].min() == 255 and out.sum() == 255 * (30 + 30 - 1)


def test_colour_segmentation_on_shapes_world():
    world = ShapesWorld(seed=7, size=96)
    palette = np.array(list(BACKGROUND_COLOURS.values()))
    for index in range(4):
        image, _, scene = world.sample(index)
        seg = np.asarray(colour_segmentation(image))
        colours = {tuple(c) for c in seg.reshape(-1, 3)}
        assert colours <= {tuple(c) for c in palette}
        for o in scene.objects:  # the centre of every object carries the object's colour
            cx, cy = (int(v * 96) for v in o.center)
            if o.shape not in ("cross", "star", "heart"):  # centroids of these may sit near a thin part
                assert tuple(seg[cy, cx]) == COLOURS[o.colour], (index, o)
    with pytest.raises(EstableError, match="unknown control type"):
        make_control_image("depth", image)
    assert make_control_image("none", image).size == image.size


def test_control_image_command(tmp_path, capsys):
    src = tmp_path / "in.png"
    Image.fromarray(_noisy_picture()).save(src)
    out = tmp_path / "edges.png"
    assert cli.main(["control-image", "canny", str(src), str(out), "--low", "50", "--high", "150"]) == 0
    assert _f1(np.asarray(Image.open(out))[..., 0] > 0, cv2.Canny(_noisy_picture(), 50, 150) > 0) > 0.98
    assert cli.main(["control-image", "seg", str(src), str(tmp_path / "seg.png")]) == 0
    capsys.readouterr()
    assert cli.main(["control-image", "seg", str(src), str(tmp_path / "x.png"), "--low", "3"]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert cli.main(["control-image", "canny", str(tmp_path / "missing.png"), str(out)]) == 2
    assert "not found" in capsys.readouterr().err
