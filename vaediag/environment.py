"""What a run was made with: versions, device, threads, git revision. Saved as environment.json."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import torch

from vaediag.errors import UserError

_PACKAGES = ("vaediag", "torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "lpips",
             "scikit-image", "piq")


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be usable."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (torch "
                            f"{torch.__version__}, {torch.cuda.device_count()} GPU(s) visible)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    if name == "mps" and not mps_ok:
        raise UserError("--device mps: Apple's MPS backend is not available here")
    return torch.device(name)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    """The git commit of the working directory's repository, if it is one (the user's code)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def collect(device: torch.device, seed: int | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "seed": seed,
        "git_revision": _git_revision(),
        "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
