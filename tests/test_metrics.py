"""Image metrics against scikit-image and other slow, obvious references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vaediag.metrics import image
from vaediag.metrics import lpips as lpips_metric


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def _np(t: torch.Tensor, i: int) -> np.ndarray:
    return t[i].double().numpy()


def test_ssim_matches_scikit_image(pair):
    x, y = pair
    ours = image.ssim(x, y)
    for i in range(4):
        ref = structural_similarity(_np(x, i), _np(y, i), channel_axis=0, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(image.ssim(x, x), torch.ones(4), atol=1e-5)


def test_psnr_matches_scikit_image(pair):
    x, y = pair
    ours = image.psnr(x, y)
    for i in range(4):
        ref = peak_signal_noise_ratio(_np(x, i), _np(y, i), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, rel=1e-5)


def test_lab_and_ciede2000_match_scikit_image(pair):
    x, y = pair
    x = x.clone()
    y = y.clone()
    x[0, :, :3] = 0.5  # neutral greys: zero chroma, the formula's special case
    y[0, :, :3] = 0.5
    x[1, :, 0], y[1, :, 0] = 0.0, 1.0  # black against white
    to_hwc = lambda t: t.double().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    np.testing.assert_allclose(image.rgb_to_lab(x).numpy().transpose(0, 2, 3, 1),
                               rgb2lab(to_hwc(x), channel_axis=-1), atol=2e-4)
    ref = deltaE_ciede2000(rgb2lab(to_hwc(x), channel_axis=-1), rgb2lab(to_hwc(y), channel_axis=-1),
                           channel_axis=-1)
    ours = image.ciede2000(image.rgb_to_lab(x), image.rgb_to_lab(y)).numpy()
    np.testing.assert_allclose(ours, ref, atol=5e-4)
    np.testing.assert_allclose(image.colour_de(x, y).numpy(), ref.reshape(4, -1).mean(1),
                               rtol=1e-4)
    assert image.colour_de(x, x).abs().max() < 1e-3


def test_saturation_ratio():
    colourful = torch.full((2, 3, 8, 8), 0.3)
    colourful[:, 0] = 0.9  # saturation (0.9 - 0.3) / 0.9 = 2/3
    grey = colourful.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(image.sat_ratio(colourful, colourful), torch.ones(2))
    assert torch.allclose(image.sat_ratio(colourful, grey), torch.zeros(2))
    half = colourful.clone()
    half[:, 1:] = 0.6  # saturation (0.9 - 0.6) / 0.9 = 1/3
    assert torch.allclose(image.sat_ratio(colourful, half), torch.full((2,), 0.5), atol=1e-5)


def _ellipse(angle_deg: float, size: int = 64, cx: float = 32.0) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    t = math.radians(angle_deg)
    u = (xs - cx) * math.cos(t) + (ys - 32) * math.sin(t)
    v = -(xs - cx) * math.sin(t) + (ys - 32) * math.cos(t)
    inside = ((u / 20) ** 2 + (v / 8) ** 2 <= 1).float()
    img = torch.stack([0.2 + 0.7 * inside, 0.3 * torch.ones_like(inside), 0.5 - 0.3 * inside])
    return img[None]


@pytest.mark.parametrize("angle", [-60.0, -20.0, 0.0, 35.0, 80.0])
def test_foreground_axis_angle(angle):
    measured, cx, cy = image.foreground_moments(_ellipse(angle))
    # y points down, so a positive rotation in these coordinates is clockwise on screen
    assert measured.item() == pytest.approx(angle, abs=1.0)
    assert cx.item() == pytest.approx(31.5, abs=0.3) and cy.item() == pytest.approx(31.5, abs=0.3)


def test_orientation_and_centroid_errors():
    err, centroid = image.orientation_errors(_ellipse(10.0), _ellipse(40.0, cx=36.0))
    assert err.item() == pytest.approx(30.0, abs=1.5)
    assert centroid.item() == pytest.approx(4.0, abs=0.5)
    # Axes are undirected: -80 and +80 degrees are 20 apart, not 160.
    err, _ = image.orientation_errors(_ellipse(-80.0), _ellipse(80.0))
    assert err.item() == pytest.approx(20.0, abs=1.5)


def test_gmsd_and_haarpsi(pair):
    x, y = pair
    assert image.gmsd(x, x).abs().max() < 1e-6 and (image.gmsd(x, y) > 0.01).all()
    assert torch.allclose(image.haarpsi(x, x), torch.ones(4), atol=1e-4)
    assert (image.haarpsi(x, y) < 0.99).all()
    assert torch.isnan(image.haarpsi(x[:, :, :16, :16], y[:, :, :16, :16])).all()


@pytest.fixture
def alexnet_file(tmp_path):
    """A locally built AlexNet weights file (random, so *not* torchvision's ImageNet file)."""
    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def test_lpips_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    metric, status = lpips_metric.load(None, allow_download=False)
    assert metric is None and not status.available
    assert "backbone weights not found" in status.reason
    assert status.describe().startswith("lpips unavailable: ")


def test_lpips_with_a_local_backbone_file(alexnet_file, pair):
    x, y = pair
    metric, status = lpips_metric.load(str(alexnet_file))
    assert status.available and status.weights == str(alexnet_file)
    assert not status.verified and "UNVERIFIED" in status.describe()
    assert torch.allclose(metric(x, x), torch.zeros(4), atol=1e-6)
    d = metric(x, y)
    assert d.shape == (4,) and (d > 0).all()
    # The same numbers as the lpips package with the backbone built the plain torchvision way.
    import lpips as lpips_package

    reference = lpips_package.LPIPS(net="alex", pnet_rand=True, verbose=False)
    features = torchvision.models.alexnet()
    features.load_state_dict(torch.load(alexnet_file, weights_only=True))
    for i in range(1, 6):
        for index, _ in getattr(reference.net, f"slice{i}").named_children():
            getattr(reference.net, f"slice{i}")._modules[index] = features.features[int(index)]
    with torch.no_grad():
        up = lambda t: torch.nn.functional.interpolate(t, size=(64, 64), mode="bilinear")  # noqa: E731
        expected = reference(up(x), up(y), normalize=True).flatten()
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=1e-5)


def test_lpips_verification_checks_the_hash(alexnet_file, monkeypatch):
    digest = lpips_metric._sha256(alexnet_file)
    monkeypatch.setattr(lpips_metric, "_expected", lambda: ("alexnet-x.pth", digest[:8]))
    _, status = lpips_metric.load(str(alexnet_file))
    assert status.verified and status.sha256 == digest


def test_lpips_hub_cache_is_found(alexnet_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))
    filename, _ = lpips_metric._expected()
    cache = tmp_path / "hub-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / filename).write_bytes(alexnet_file.read_bytes())
    _, status = lpips_metric.load(None, allow_download=False)
    assert status.available and "torch hub cache" in status.reason


def test_lpips_damaged_file_is_unavailable_not_fatal(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    metric, status = lpips_metric.load(str(bad))
    assert metric is None and "cannot load AlexNet weights" in status.reason
