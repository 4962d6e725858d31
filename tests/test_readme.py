"""The README's code runs: every Python block is executed (against a tiny model, loader and
run where it names the user's own), and every ``vaediag`` command line in its shell blocks is
parsed by the real command line, its ``--set`` keys by the real configuration."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import vaediag

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README.read_text()) if lang == language]


def _namespace() -> dict:
    """What the README's blocks call the user's own: a model, its optimizer, data, losses."""
    sys.path.insert(0, str(README.parent / "examples"))
    from lightning.pytorch import Trainer
    from own_loop import TinyVAE

    torch.manual_seed(0)
    model = TinyVAE(16)
    g = torch.Generator().manual_seed(1)
    return {
        "torch": torch, "model": model, "beta": 1.0, "epochs": 2, "Trainer": Trainer,
        "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3),
        "val_batch": torch.rand(8, 3, 16, 16, generator=g),
        "train_batch": torch.rand(8, 3, 16, 16, generator=g),
        "loader": [torch.rand(16, 3, 16, 16, generator=g) for _ in range(3)],
        "my_recon_loss": lambda logits, x: F.binary_cross_entropy_with_logits(
            logits, x, reduction="none").sum((1, 2, 3)),
        "my_kl": lambda mu, logvar: 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1),
    }


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 3 and len(blocks("sh")) >= 4


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_block_of_the_readme_runs(index, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_run, tmp_path / "runs" / "first")
    code = blocks("python")[index]
    namespace = _namespace()
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
    if 'Monitor("runs/mine"' in code:  # the own loop: 2 epochs of 3 batches, a step each
        run = vaediag.load_run(tmp_path / "runs" / "mine")
        assert run.status == "finished"
        assert run.scalars["step"].tolist() == list(range(6))
        assert run.config["optim"]["name"] == "Adam"
    if 'Monitor("runs/amp"' in code:  # mixed precision: one epoch, the scale recorded
        run = vaediag.load_run(tmp_path / "runs" / "amp")
        assert run.status == "finished" and run.scalars["step"].tolist() == list(range(3))
        assert run.scalars["loss_scale"].iloc[0] == 65536.0


def _command_lines() -> list[list[str]]:
    lines = []
    for body in blocks("sh"):
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["vaediag"]:
                lines.append(words[1:])
            elif words[:1] == ["torchrun"] and "vaediag" in words:
                lines.append(words[words.index("vaediag") + 1:])
    return lines


def test_every_vaediag_command_line_of_the_readme_parses():
    """Options and their values as the real command takes them; ``--set`` keys as the real
    configuration takes them (an unknown or mistyped key fails)."""
    import click

    from vaediag.cli import cli
    from vaediag.config import build_config

    lines = _command_lines()
    assert {words[0] for words in lines} >= {"train", "analyze", "replay", "compare"}
    for words in lines:
        name, args = words[0], words[1:]
        with click.Context(cli) as parent:
            context = cli.commands[name].make_context(name, list(args), parent=parent)
        sets = context.params.get("overrides") or ()
        if sets:
            build_config(overrides=list(sets))


def test_the_submodules_the_readme_names_are_there_after_import_vaediag():
    """In a fresh interpreter (this one has imported them all by now)."""
    import subprocess

    code = ("import sys, vaediag; vaediag.columns.matrix; vaediag.analysis.verdict; "
            "vaediag.errors.UserError; assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
