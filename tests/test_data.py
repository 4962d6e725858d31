from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vaediag.config import DataConfig
from vaediag.data import load_dataset
from vaediag.data.images import load_array, load_folder
from vaediag.errors import DataError


def _solid(colour, size=(24, 24), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.fixture
def messy_folder(tmp_path):
    """A folder as users have them: nested, mixed formats and modes, junk among the images."""
    root = tmp_path / "faces"
    (root / "a" / "b").mkdir(parents=True)
    _solid((255, 0, 0)).save(root / "red.png")
    _solid((0, 0, 255)).save(root / "a" / "blue.jpg", quality=95)
    _solid(128, mode="L").save(root / "a" / "gray.png")
    _solid((0, 255, 0, 0), mode="RGBA").save(root / "a" / "b" / "clear.png")  # transparent
    _solid((0, 255, 0, 255), mode="RGBA").save(root / "a" / "b" / "green.webp")
    _solid((10, 20, 30)).convert("P").save(root / "palette.gif")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "a" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 20)
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def test_folder_loads_converts_and_skips(messy_folder):
    images, skipped = load_folder(messy_folder, 16)
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    assert len(skipped.corrupt) == 2 and skipped.not_images == [str(messy_folder / "notes.txt")]
    assert "2 unreadable image file(s)" in skipped.summary()
    assert "1 non-image file(s)" in skipped.summary()
    # Files are read in sorted path order: a/b/clear.png, a/b/green.webp, a/blue.jpg, ...
    means = images.reshape(6, 3, -1).mean(-1)
    np.testing.assert_allclose(means[0], [255, 255, 255], atol=1)  # transparent -> white
    np.testing.assert_allclose(means[1], [0, 255, 0], atol=3)
    np.testing.assert_allclose(means[2], [0, 0, 255], atol=6)  # jpeg
    np.testing.assert_allclose(means[3], [128, 128, 128], atol=1)  # gray -> 3 equal channels


def test_centre_crop_keeps_the_middle(tmp_path):
    strip = np.zeros((20, 60, 3), np.uint8)
    strip[:, :20] = (255, 0, 0)
    strip[:, 20:40] = (0, 255, 0)
    strip[:, 40:] = (0, 0, 255)
    Image.fromarray(strip).save(tmp_path / "wide.png")
    images, _ = load_folder(tmp_path, 8)
    np.testing.assert_allclose(images[0].reshape(3, -1).mean(1), [0, 255, 0], atol=5)


def test_max_images_picks_a_seeded_subset(tmp_path):
    for i in range(10):
        _solid((i * 20, 0, 0)).save(tmp_path / f"{i}.png")
    a, _ = load_folder(tmp_path, 8, max_images=4, rng=np.random.default_rng(1))
    b, _ = load_folder(tmp_path, 8, max_images=4, rng=np.random.default_rng(1))
    assert len(a) == 4 and np.array_equal(a, b)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_folder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files under"):
        load_folder(tmp_path / "empty", 16)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"no usable image under .*1 unreadable"):
        load_folder(junk, 16)


@pytest.mark.parametrize(
    ("make", "expected_mean"),
    [
        (lambda: np.full((12, 20, 20, 3), 200, np.uint8), 200),  # NHWC uint8
        (lambda: np.full((12, 3, 16, 16), 0.5, np.float32), 128),  # NCHW float
        (lambda: np.full((12, 16, 16), 50, np.uint8), 50),  # grayscale
        (lambda: np.full((12, 16, 16, 1), 50, np.uint8), 50),
    ],
)
def test_arrays(tmp_path, make, expected_mean):
    path = tmp_path / "x.npy"
    np.save(path, make())
    images = load_array(path, 16)
    assert images.shape == (12, 3, 16, 16) and images.dtype == np.uint8
    assert abs(images.mean() - expected_mean) <= 1


def test_npz_key_selection_and_errors(tmp_path):
    np.savez(tmp_path / "one.npz", faces=np.zeros((9, 8, 8, 3), np.uint8))
    assert load_array(tmp_path / "one.npz", 8).shape == (9, 3, 8, 8)
    np.savez(tmp_path / "named.npz", images=np.zeros((9, 8, 8, 3), np.uint8), labels=np.ones(9))
    assert load_array(tmp_path / "named.npz", 8).shape == (9, 3, 8, 8)
    np.savez(tmp_path / "two.npz", a=np.zeros((9, 8, 8, 3)), b=np.ones(9))
    with pytest.raises(DataError, match="name the images array 'images'"):
        load_array(tmp_path / "two.npz", 8)
    np.save(tmp_path / "range.npy", np.full((9, 8, 8, 3), 3.0))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        load_array(tmp_path / "range.npy", 8)
    np.save(tmp_path / "shape.npy", np.zeros((9, 8)))
    with pytest.raises(DataError, match="expected images shaped"):
        load_array(tmp_path / "shape.npy", 8)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read"):
        load_array(tmp_path / "objects.npy", 8)
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match="cannot read"):
        load_array(tmp_path / "text.npy", 8)


def test_split_is_fixed_and_disjoint(tmp_path):
    # 40 images, each a distinct colour, so we can tell them apart after loading.
    for i in range(40):
        _solid((i * 6, 255 - i * 6, 7)).save(tmp_path / f"{i:02d}.png")
    cfg = DataConfig(source=str(tmp_path), resolution=8, val_size=10)
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert len(first.train) == 30 and len(first.val) == 10
    assert np.array_equal(first.val, second.val) and np.array_equal(first.train, second.train)
    key = lambda imgs: {tuple(im[:, 0, 0]) for im in imgs}  # noqa: E731
    assert not key(first.train) & key(first.val)
    assert len(key(first.train) | key(first.val)) == 40


def test_toyfaces_split_and_factors():
    cfg = DataConfig(resolution=16, toyfaces_size=64, val_size=12)
    data = load_dataset(cfg)
    assert data.train.shape == (64, 3, 16, 16) and data.val.shape == (12, 3, 16, 16)
    assert set(data.val_factors) >= {"skin_r", "angle", "turn"}
    assert len(data.val_factors["angle"]) == 12
    flat_train = {im.tobytes() for im in data.train}
    assert not any(im.tobytes() in flat_train for im in data.val)


def test_too_few_images_for_the_validation_split(tmp_path):
    for i in range(5):
        _solid((i, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=r"has 5 usable images; need more than data\.val_size"):
        load_dataset(DataConfig(source=str(tmp_path), resolution=8, val_size=8))


def test_missing_source():
    with pytest.raises(DataError, match="data source not found"):
        load_dataset(DataConfig(source="/nonexistent/faces"))
