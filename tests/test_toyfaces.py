from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vaediag.data import toyfaces
from vaediag.data.toyfaces import FACTOR_NAMES, FaceFactors


def _one_face(**changes) -> FaceFactors:
    base = dict(
        skin=np.array([[0.9, 0.75, 0.6]]), hair=np.array([[0.2, 0.3, 0.8]]),
        eye=np.array([[0.1, 0.7, 0.2]]), background=np.array([[0.5, 0.8, 0.5]]),
        angle=np.array([0.0]), turn=np.array([0.0]), center=np.array([[0.0, 0.0]]),
        size=np.array([0.6]), hair_length=np.array([0.5]), eye_size=np.array([1.0]),
    )
    base.update({k: np.asarray(v, dtype=float) for k, v in changes.items()})
    return FaceFactors(**base)


def test_deterministic_in_seed_and_stream():
    a, fa = toyfaces.generate(40, 32, seed=3)
    b, fb = toyfaces.generate(40, 32, seed=3)
    assert np.array_equal(a, b)
    assert all(np.array_equal(fa.table()[k], fb.table()[k]) for k in FACTOR_NAMES)
    c, _ = toyfaces.generate(40, 32, seed=4)
    d, _ = toyfaces.generate(40, 32, seed=3, stream=1)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


def test_a_larger_set_starts_with_the_smaller_one():
    small, _ = toyfaces.generate(5, 16, seed=3)
    large, _ = toyfaces.generate(50, 16, seed=3)
    assert np.array_equal(small, large[:5])


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_shapes_and_dtype_at_every_resolution(resolution):
    images, factors = toyfaces.generate(5, resolution, seed=0)
    assert images.shape == (5, 3, resolution, resolution)
    assert images.dtype == np.uint8
    assert len(factors) == 5
    assert images.std() > 20  # not a blank canvas


def test_factor_ranges():
    _, f = toyfaces.generate(2000, 16, seed=1)
    table = f.table()
    assert list(table) == list(FACTOR_NAMES)
    for name in FACTOR_NAMES:
        if name.endswith(("_r", "_g", "_b")):
            assert table[name].min() >= 0.0 and table[name].max() <= 1.0
    assert toyfaces.ANGLE_RANGE[0] <= table["angle"].min() < -25
    assert 25 < table["angle"].max() <= toyfaces.ANGLE_RANGE[1]
    assert -1.0 <= table["turn"].min() < -0.9 and 0.9 < table["turn"].max() <= 1.0
    assert np.abs(table["center_x"]).max() <= 0.1 and np.abs(table["center_y"]).max() <= 0.1
    lo, hi = toyfaces.SIZE_RANGE
    assert lo <= table["size"].min() and table["size"].max() <= hi
    # Different factors vary independently (the R, G, B of one colour are coupled through HSV).
    group = [n.rsplit("_", 1)[0] if n.endswith(("_r", "_g", "_b")) else n for n in FACTOR_NAMES]
    corr = np.corrcoef(np.stack([table[n] for n in FACTOR_NAMES]))
    across = np.array([[a != b for b in group] for a in group])
    assert np.abs(corr[across]).max() < 0.1


def test_factor_table_round_trips():
    _, f = toyfaces.generate(7, 16, seed=2)
    again = FaceFactors.from_table(f.table())
    for k in FaceFactors.__dataclass_fields__:
        np.testing.assert_allclose(getattr(again, k), getattr(f, k), atol=1e-6)


def test_pixels_show_the_factors_colours():
    face = _one_face()
    img = toyfaces.render(face, 64)[0].transpose(1, 2, 0).astype(float) / 255
    top_left = img[0, 0]
    np.testing.assert_allclose(top_left, face.background[0], atol=0.02)
    # The cheek: face-local (0.6, 0.62) -> image coords (0.36, 0.37) -> pixel (43.5, 43.8).
    cheek = img[43, 43]
    np.testing.assert_allclose(cheek, face.skin[0], atol=0.02)
    # The forehead is covered by the bangs: face-local (0, -0.6) -> image y -0.36 -> row 20.
    np.testing.assert_allclose(img[20, 32], face.hair[0], atol=0.02)


def test_angle_is_clockwise_in_degrees():
    upright = toyfaces.render(_one_face(), 64)[0].transpose(1, 2, 0)
    tilted = toyfaces.render(_one_face(angle=[25.0]), 64)[0].transpose(1, 2, 0).astype(float)
    fill = tuple(int(c) for c in upright[0, 0])

    def rotated(degrees_ccw: float) -> np.ndarray:
        img = Image.fromarray(upright).rotate(degrees_ccw, Image.Resampling.BILINEAR,
                                              fillcolor=fill)
        return np.asarray(img, dtype=float)

    clockwise = np.abs(rotated(-25) - tilted).mean()
    counter = np.abs(rotated(25) - tilted).mean()
    unrotated = np.abs(upright.astype(float) - tilted).mean()
    assert clockwise < 0.4 * counter and clockwise < 0.4 * unrotated


def test_turn_moves_features_toward_the_turned_side():
    def mouth_x(turn: float) -> float:
        img = toyfaces.render(_one_face(turn=[turn]), 64)[0].astype(float) / 255
        red = (img[0] > 0.45) & (img[1] < 0.25) & (img[2] < 0.3)  # the mouth's colour
        return float(np.nonzero(red)[1].mean())

    assert mouth_x(1.0) > mouth_x(0.0) + 3 > mouth_x(-1.0) + 6
    left = toyfaces.render(_one_face(turn=[-0.8]), 64)[0]
    right = toyfaces.render(_one_face(turn=[0.8]), 64)[0]
    # A turned face is (almost) the mirror image of the opposite turn; the eye highlights,
    # which are always upper-left, are the only asymmetry.
    assert np.abs(left[:, :, ::-1].astype(int) - right).mean() < 4


def test_resolution_out_of_range():
    with pytest.raises(ValueError, match=r"8\.\.512"):
        toyfaces.render(_one_face(), 4)


def test_export_writes_images_and_their_factors(tmp_path):
    import csv

    csv_path = toyfaces.export(tmp_path / "faces", 12, 24, seed=5)
    rows = list(csv.DictReader(csv_path.open()))
    images, factors = toyfaces.generate(12, 24, seed=5)
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(12)]
    for i in (0, 11):
        on_disk = np.asarray(Image.open(tmp_path / "faces" / rows[i]["file"])).transpose(2, 0, 1)
        assert np.array_equal(on_disk, images[i])
        assert float(rows[i]["angle"]) == pytest.approx(factors.angle[i], abs=1e-4)
        assert float(rows[i]["hair_g"]) == pytest.approx(factors.hair[i, 1], abs=1e-5)
