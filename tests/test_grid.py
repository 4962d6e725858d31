from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vaediag import grid
from vaediag.config import build_config
from vaediag.model import ConvVAE
from vaediag.rundir import load_run


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
def test_layout_tiles_do_not_overlap_and_fit(resolution):
    geo = grid.layout(resolution)
    assert geo.tile >= 64 and geo.tile % resolution == 0
    boxes = [geo.tile_box(r, c) for r in range(4) for c in range(8)]
    width, height = geo.size
    for i, (l1, t1, r1, b1) in enumerate(boxes):
        assert 0 <= l1 < r1 <= width and 0 <= t1 < b1 <= height
        for l2, t2, r2, b2 in boxes[i + 1:]:
            assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1
    # The caption band lies between rows 2 and 3.
    _, cap_top, _, cap_bottom = geo.caption_box(0)
    assert geo.tile_box(1, 0)[3] == cap_top and cap_bottom < geo.tile_box(2, 0)[1]


def test_render_and_read_back_are_exact():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (4, 8, 3, 16, 16), dtype=np.uint8)
    png = grid.to_png(grid.render(tiles, ["a", "b", "c"], captions=[["x", "y"]] * 8))
    assert np.array_equal(grid.read_tiles(png, 16), tiles)
    with Image.open(__import__("io").BytesIO(png)) as img:
        assert img.size == grid.layout(16).size


def test_render_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="uint8"):
        grid.render(np.zeros((4, 7, 3, 8, 8), np.uint8), [])


def _model_at(run, step: int) -> ConvVAE:
    config = build_config(base=run.config)
    model = ConvVAE.from_config(config)
    path = dict(run.checkpoints)[step]
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval()


def test_grid_rows_are_what_they_say(tiny_run):
    """Re-decode from the saved checkpoints: every row of every kept eval matches exactly."""
    run = load_run(tiny_run)
    fixed = run.fixed
    images = torch.from_numpy(fixed["eval_images"]).float() / 255
    fixed_z = torch.from_numpy(fixed["fixed_z"])
    grids = dict(run.grids)
    assert len(run.checkpoints) == 3  # one per evaluation, all kept
    for step, _ in run.checkpoints:
        tiles = grid.read_tiles(grids[step].read_bytes(), 16)
        model = _model_at(run, step)
        with torch.no_grad():
            mu, _ = model.encode(images)
            expected = torch.stack([images, model.decode(mu),
                                    model.decode(torch.zeros(1, 4)).expand(8, -1, -1, -1),
                                    model.decode(fixed_z)])
        expected = (expected * 255).round().to(torch.uint8).numpy()
        assert np.abs(tiles.astype(int) - expected).max() <= 1, f"grid at step {step}"


def test_grid_invariants_across_evaluations(tiny_run):
    run = load_run(tiny_run)
    all_tiles = [grid.read_tiles(path.read_bytes(), 16) for _, path in run.grids]
    assert len(all_tiles) == 3  # steps 0, 16 (one epoch) and 30 (the end)
    for tiles in all_tiles:
        assert tiles.shape == (4, 8, 3, 16, 16)
        assert (tiles[2] == tiles[2][0]).all()  # row 3: eight copies of decode(0)
        assert np.array_equal(tiles[0], run.fixed["eval_images"])  # row 1: the same 8 images
    # Row 4 changes only because the model learns: its z is saved once for the whole run.
    assert run.fixed["fixed_z"].shape == (8, 4)
    assert not np.array_equal(all_tiles[0][3], all_tiles[-1][3])
