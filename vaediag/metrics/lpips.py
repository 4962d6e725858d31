"""LPIPS (Zhang et al. 2018) with its AlexNet backbone, loaded without surprises.

LPIPS needs torchvision's ImageNet AlexNet weights. vaediag looks for them, in order: a file
given with ``--lpips-weights PATH`` (config ``probes.lpips_weights``), then torchvision's file in
the torch hub cache (``$TORCH_HOME/hub/checkpoints``), then, only if ``probes.lpips_download`` is
true, a download by torchvision. It never downloads implicitly otherwise, and it never uses a
randomly initialised backbone: without weights LPIPS is reported *unavailable*, with the reason,
and the other metrics carry on.

A weights file is *verified* when its SHA-256 starts with the hash torchvision puts in the
file's name; an unverified file (another AlexNet, a test fixture) is used but recorded as such,
so a report never shows its numbers as LPIPS without saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DOWNLOAD_TIMEOUT_S = 20


@dataclass
class LPIPSStatus:
    available: bool
    reason: str  # why not, or where the weights came from
    weights: str | None = None  # the file used
    sha256: str | None = None
    verified: bool = False

    def describe(self) -> str:
        if not self.available:
            return f"lpips unavailable: {self.reason}"
        check = "verified torchvision AlexNet weights" if self.verified else \
            "UNVERIFIED weights (not torchvision's ImageNet AlexNet file)"
        return f"lpips from {self.reason}: {check}"


#: AlexNet's strided layers need inputs of about 32 px or more; smaller images are upsampled
#: (bilinear) to this size before LPIPS, the usual practice for small images.
MIN_SIZE = 64


class LPIPSMetric:
    """Per-image LPIPS distance between two batches of images in [0, 1]."""

    def __init__(self, model: torch.nn.Module, status: LPIPSStatus):
        self.model = model
        self.status = status

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x, y = x.to(device).float(), y.to(device).float()
        if min(x.shape[-2:]) < MIN_SIZE:
            size = (MIN_SIZE, MIN_SIZE)
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = torch.nn.functional.interpolate(y, size=size, mode="bilinear", align_corners=False)
        d = self.model(x, y, normalize=True)
        return d.flatten().cpu()


def _expected() -> tuple[str, str]:
    """(file name, expected sha256 prefix) of torchvision's ImageNet AlexNet weights."""
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    filename = url.rsplit("/", 1)[-1]
    return filename, filename.rsplit("-", 1)[-1].split(".")[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_weights(explicit: str | None, allow_download: bool) -> tuple[Path | None, str]:
    """Locate the AlexNet weights file; (path or None, where it came from or why not)."""
    filename, _ = _expected()
    if explicit:
        path = Path(explicit).expanduser()
        return (path, f"--lpips-weights {path}") if path.is_file() else \
            (None, f"--lpips-weights {path}: no such file")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached, f"the torch hub cache ({cached})"
    if not allow_download:
        return None, (f"backbone weights not found: put torchvision's {filename} in "
                      f"{_home_relative(cached.parent)} or pass --lpips-weights PATH")
    from torchvision.models import AlexNet_Weights

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            torch.hub.load_state_dict_from_url(AlexNet_Weights.IMAGENET1K_V1.url, progress=False,
                                               check_hash=True)
    except Exception as exc:  # noqa: BLE001 - any network or file failure means "unavailable"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return None, (f"could not download the backbone weights ({reason}); pass "
                      f"--lpips-weights PATH or put {filename} in {cached.parent}")
    finally:
        socket.setdefaulttimeout(previous)
    return cached, "a download into the torch hub cache"


def load(explicit: str | None = None, allow_download: bool = False,
         device: torch.device | str = "cpu") -> tuple[LPIPSMetric | None, LPIPSStatus]:
    """Build LPIPS if its weights can be had; never with a random backbone."""
    path, where = find_weights(explicit, allow_download)
    if path is None:
        return None, LPIPSStatus(False, where)
    try:
        import lpips
    except ImportError as exc:
        return None, LPIPSStatus(False, f"the lpips package cannot be imported ({exc})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items()
                    if k.startswith("features.")}
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notes about lpips' call
            # pnet_rand=True builds the backbone without downloading; we fill it right below.
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        loaded = 0
        for i in range(1, model.net.N_slices + 1):
            for index, module in getattr(model.net, f"slice{i}").named_children():
                own = {k: features[f"{index}.{k}"] for k in module.state_dict()}
                module.load_state_dict(own)
                loaded += len(own)
        if loaded == 0:
            raise ValueError("no AlexNet feature weights in the file")
    except Exception as exc:  # noqa: BLE001 - a wrong or damaged file must not stop training
        return None, LPIPSStatus(False, f"cannot load AlexNet weights from {path}: "
                                        f"{str(exc).splitlines()[0][:160]}")
    digest = _sha256(path)
    verified = digest.startswith(_expected()[1])
    model.eval().requires_grad_(False)
    status = LPIPSStatus(True, where, str(path), digest, verified)
    return LPIPSMetric(model.to(device), status), status


def _home_relative(path: Path) -> str:
    """``~/...`` for a path under the home directory (messages and reports travel)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)
