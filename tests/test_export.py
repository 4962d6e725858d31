"""vaediag export --tensorboard: real event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image

from tests.conftest import run_cli
from vaediag.rundir import load_run


def test_export_writes_what_tensorboard_reads(tiny_run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, err = run_cli(capsys, "export", tiny_run, "--tensorboard", tmp_path / "tb")
    assert code == 0, err
    assert f"to {tmp_path / 'tb' / 'tiny'}" in out
    events = EventAccumulator(str(tmp_path / "tb" / "tiny"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    run = load_run(tiny_run)
    recon = events.Scalars("train/recon")
    assert [e.step for e in recon] == list(run.scalars["step"])
    np.testing.assert_allclose([e.value for e in recon], run.scalars["recon"], rtol=1e-6)
    layer = next(c for c in run.scalars.columns if c.startswith("layer.grad_norm/"))
    assert len(events.Scalars(f"train/{layer}")) == len(run.scalars)
    ssim = events.Scalars("eval/ssim")
    assert [e.step for e in ssim] == list(run.evals["step"])
    grids = events.Images("grid")
    assert [g.step for g in grids] == [s for s, _ in run.grids]
    with Image.open(io.BytesIO(grids[-1].encoded_image_string)) as shown, \
            Image.open(run.grids[-1][1]) as stored:
        assert shown.size == stored.size
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(stored.convert("RGB")))
    assert "vaediag/config/text_summary" in events.Tags()["tensors"]


def test_export_refuses_to_write_over_an_export(tiny_run, tmp_path, capsys):
    assert run_cli(capsys, "export", tiny_run, "--tensorboard", tmp_path)[0] == 0
    code, _, err = run_cli(capsys, "export", tiny_run, "--tensorboard", tmp_path)
    assert code == 2 and "pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert run_cli(capsys, "export", tiny_run, "--tensorboard", tmp_path, "--overwrite")[0] == 0
    assert len(list((tmp_path / "tiny").iterdir())) == 1  # replaced, not added to


def test_export_without_tensorboard_says_how_to_get_it(tiny_run, tmp_path, capsys,
                                                       monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")
                 or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    code, _, err = run_cli(capsys, "export", tiny_run, "--tensorboard", tmp_path)
    assert code == 2
    assert "pip install 'vaediag[tensorboard]'" in err and len(err.strip().splitlines()) == 1
