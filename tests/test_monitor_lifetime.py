"""How a run recorded from a user's loop ends: closed by the loop, by a ``with`` block, by an
exception that ends the process, or at exit when ``close()`` was forgotten. A run never says
``running`` after its process is gone, and no row is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import vaediag
from vaediag.errors import UserError

sys.path.insert(0, "examples")
from own_loop import TinyVAE

RES = 16


def _images(n=8, seed=1):
    return torch.rand(n, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def _step(mon, model, optimizer, step, x):
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    recon = torch.nn.functional.binary_cross_entropy_with_logits(
        model.decode_logits(z), x, reduction="sum") / len(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
    optimizer.zero_grad()
    (recon + kl).backward()
    mon.after_backward(step, recon=recon, kl=kl, mu=mu, logvar=logvar)
    optimizer.step()
    mon.after_step(step)


def _parts(seed=0):
    torch.manual_seed(seed)
    model = TinyVAE(RES)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_a_step_that_does_not_grow_is_an_error_that_says_to_pass_a_global_step(tmp_path):
    """``for step, x in enumerate(loader)`` inside an epoch loop gives 0, 1, 2, 0, ...: the
    second 0 is refused at once, and nothing of it is recorded."""
    model, optimizer = _parts()
    mon = vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=_images(),
                          probes="off", online=False)
    x = _images(16, seed=2)
    for step in range(3):
        _step(mon, model, optimizer, step, x)
    with pytest.raises(UserError, match=r"step 0 comes after step 2.*global step.*not the "
                                        r"batch's index within its epoch"):
        _step(mon, model, optimizer, 0, x)
    with pytest.raises(UserError, match="step 2 comes after step 2"):
        _step(mon, model, optimizer, 2, x)
    _step(mon, model, optimizer, 3, x)  # the loop goes on with the right step
    mon.close()
    run = vaediag.load_run(tmp_path / "run")
    assert run.scalars["step"].tolist() == [0, 1, 2, 3]
    assert run.status == "finished"


def test_a_with_block_closes_the_run_finished_or_failed_with_the_exception(tmp_path):
    model, optimizer = _parts()
    x = _images(16, seed=2)
    with vaediag.Monitor(tmp_path / "ok", model, optimizer, eval_images=_images(),
                         probes="off", online=False, eval_every=1000) as mon:
        for step in range(5):
            _step(mon, model, optimizer, step, x)
    run = vaediag.load_run(tmp_path / "ok")
    assert run.status == "finished" and len(run.scalars) == 5
    assert run.evals["step"].tolist() == [0, 5]  # closed as close() closes: a final grid

    with pytest.raises(ValueError, match="the data ran out"), \
            vaediag.Monitor(tmp_path / "bad", model, optimizer, eval_images=_images(),
                            probes="off", online=False, eval_every=1000) as mon:
        for step in range(7):
            _step(mon, model, optimizer, step, x)
        raise ValueError("the data ran out")
    info = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert info["status"] == "failed" and info["step"] == 7
    assert "ValueError: the data ran out" in info["message"]
    run = vaediag.load_run(tmp_path / "bad")
    assert len(run.scalars) == 7  # every row, the last step's included
    assert any("failed" in p and "the data ran out" in p for p in run.problems)


def test_a_rerun_into_a_failed_run_says_what_it_holds(tmp_path):
    model, optimizer = _parts()
    try:
        with vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=_images(),
                             probes="off", online=False):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with pytest.raises(vaediag.errors.RunDirError,
                       match=r"holds a failed run of 0 steps\); pass overwrite=True"):
        vaediag.Monitor(tmp_path / "run", model, optimizer, eval_images=_images())


SCRIPT = """
import sys
import torch
sys.path.insert(0, "examples")
sys.path.insert(0, "tests")
import vaediag
from own_loop import TinyVAE
from test_monitor_lifetime import _images, _parts, _step

model, optimizer = _parts()
mon = vaediag.Monitor(sys.argv[1], model, optimizer, eval_images=_images(), probes="off",
                      online=False, eval_every=1000)
x = _images(16, seed=2)
for step in range(24):
    _step(mon, model, optimizer, step, x)
{ending}
"""


@pytest.mark.parametrize("ending, status, returncode", [
    ("raise RuntimeError('the loader broke')", "failed", 1),
    ("# close() forgotten", "finished", 0),
])
def test_a_process_that_ends_without_close_leaves_a_true_run(tmp_path, ending, status,
                                                            returncode):
    """The process ends by an uncaught exception, or normally with close() forgotten: every
    one of the 24 rows is on disk and the status says what happened."""
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("{ending}", ending))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == returncode, result.stderr
    run = vaediag.load_run(tmp_path / "run")
    assert run.status == status
    assert run.scalars["step"].tolist() == list(range(24))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    if status == "failed":
        assert "RuntimeError: the loader broke" in info["message"]
        assert "close() was never called" not in result.stderr
    else:
        assert result.stderr.count("close() was never called") == 1
        assert "close() was never called" in info["message"]
        assert run.evals["step"].tolist()[-1] == 24  # the final grid, as close() makes it


def test_a_users_loop_records_its_optimizers_settings_and_their_changes(tmp_path):
    """Runs at lr 1e-3 and 1e-4 from a user's loop: the optimizer's class and hyperparameters
    are in the run's config, vaediag compare tells the two apart, the report has an optimizer
    line, and a weight decay changed mid-run is an event."""
    from vaediag.report import compare, header_rows

    x = _images(16, seed=2)
    for name, lr in (("a", 1e-3), ("b", 1e-4)):
        torch.manual_seed(0)
        model = TinyVAE(RES)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        with vaediag.Monitor(tmp_path / name, model, optimizer, eval_images=_images(),
                             probes="off", online=False, eval_every=3) as mon:
            for step in range(6):
                if step == 4:
                    optimizer.param_groups[0]["weight_decay"] = 0.1
                _step(mon, model, optimizer, step, x)
    run = vaediag.load_run(tmp_path / "b")
    optim = run.config["optim"]
    assert optim["name"] == "AdamW" and optim["lr"] == 1e-4 and optim["betas"] == [0.9, 0.999]
    assert optim["weight_decay"] == 0.01 and optim["eps"] == 1e-8
    changes = run.events[run.events["kind"] == "optimizer_settings"]
    assert changes["step"].tolist() == [6]  # the evaluation after the change
    assert changes["changed"].iloc[0] == {"weight_decay": [0.01, 0.1]}
    compared = compare.build([tmp_path / "a", tmp_path / "b"])
    assert ("optim.lr", "0.0001", "0.001") in compared.runs[1].differences
    rows = dict(header_rows(run, vaediag.analyze(run)))
    assert rows["optimizer"] == "AdamW, lr 0.0001, betas [0.9, 0.999], eps 1e-08, weight " \
                                "decay 0.01"
