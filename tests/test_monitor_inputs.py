"""What a user's loop hands the Monitor is checked where it enters: a wrong value is one error
naming the argument, and nothing is recorded wrong (never a shifted column)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import vaediag
from vaediag.errors import UserError

sys.path.insert(0, "examples")
from own_loop import TinyVAE

RES = 16


def _images(n=8, res=RES, seed=1):
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _monitor(path, model=None, **kw):
    model = model or TinyVAE(RES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    kw.setdefault("eval_images", _images())
    return vaediag.Monitor(path, model, optimizer, eval_every=1000, probes="off", **kw), \
        model, optimizer


def _losses(model, x):
    mu, logvar = model.encode(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    per_image = F.binary_cross_entropy_with_logits(model.decode_logits(z), x,
                                                   reduction="none").sum((1, 2, 3))
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return per_image, kl, mu, logvar


def test_a_per_image_loss_is_an_error_that_says_to_reduce_it(tmp_path):
    mon, model, optimizer = _monitor(tmp_path / "run")
    per_image, kl, mu, logvar = _losses(model, _images(16, seed=2))
    (per_image.mean() + kl.mean()).backward()
    with pytest.raises(UserError, match=r"recon= must be one number.*shape \(16,\).*"
                                        r"recon\.mean\(\)"):
        mon.after_backward(0, recon=per_image, kl=kl.mean(), mu=mu, logvar=logvar)
    # nothing was recorded: the same step, given right, is recorded right
    check = mon.after_backward(0, recon=per_image.mean(), kl=kl.mean(), mu=mu, logvar=logvar)
    optimizer.step()
    mon.after_step(0)
    mon.close()
    row = vaediag.load_run(tmp_path / "run").scalars.iloc[0]
    assert row["recon"] == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert row["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
    assert row["grad_norm"] == pytest.approx(check.grad_norm)


def test_latents_of_two_shapes_are_named(tmp_path):
    mon, model, _ = _monitor(tmp_path / "run")
    _, _, mu, logvar = _losses(model, _images(4, seed=2))
    with pytest.raises(UserError, match=r"mu= and logvar= must have one shape.*\(4, 8\).*\(4, 3\)"):
        mon.after_backward(0, recon=1.0, kl=1.0, mu=mu, logvar=logvar[:, :3])
    with pytest.raises(UserError, match="pass mu= and logvar= together"):
        mon.after_backward(0, recon=1.0, kl=1.0, mu=mu)
    with pytest.raises(UserError, match="mu= has 5 latent dimensions, but encode"):
        mon.after_backward(0, recon=1.0, kl=1.0, mu=mu[:, :5], logvar=logvar[:, :5])


def test_images_the_model_cannot_take_are_named_and_nothing_is_left_behind(tmp_path):
    with pytest.raises(UserError, match=r"eval_images of shape \(N, 3, 32, 32\) do not fit the "
                                        r"model: encode\(x\) failed"):
        _monitor(tmp_path / "run", eval_images=_images(res=32))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"train_images are shaped \(8, 3, 32, 32\), but "
                                        r"eval_images \(8, 3, 16, 16\)"):
        _monitor(tmp_path / "run", train_images=_images(res=32))
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"probes= must be a list of vaediag\.probes\.Probe"):
        vaediag.Monitor(tmp_path / "run", TinyVAE(RES), eval_images=_images(), probes=[1])
    assert not (tmp_path / "run").exists()


def test_a_failure_after_the_run_directory_was_made_removes_it(tmp_path, monkeypatch):
    from vaediag.monitor import evaluation

    def broken(self, seed, latent):
        raise RuntimeError("cannot draw the fixed z")

    monkeypatch.setattr(evaluation.Evaluator, "make_fixed", broken)
    with pytest.raises(RuntimeError, match="fixed z"):
        _monitor(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_python_api_speaks_python(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(vaediag.errors.RunDirError) as caught:
        _monitor(tmp_path / "run")
    assert "overwrite=True" in str(caught.value) and "--" not in str(caught.value)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


#: values that are not one number, for every numeric argument
WRONG = [torch.ones(3), torch.ones(2, 2), np.ones(4), "1.0", [1.0], {"a": 1}, b"1", True,
         torch.tensor(1 + 2j), torch.tensor(True), object(), torch.ones(0)]
#: values that are one number, however given: recorded as that number
RIGHT = [2.5, 3, np.float32(1.5), np.int64(4), torch.tensor(0.25), torch.tensor([7.0]),
         np.array([0.5]), torch.tensor(2.0, dtype=torch.float64), float("nan")]


def test_every_argument_is_an_error_naming_it_or_recorded_right(tmp_path):
    """Seeded random calls of after_backward with one argument wrong or oddly typed: each is a
    UserError naming that argument (and the Monitor goes on), or the row holds exactly the
    values given: never a value in another column."""
    rng = np.random.default_rng(0)
    mon, model, optimizer = _monitor(tmp_path / "run")
    x = _images(8, seed=3)
    expected: dict[int, dict[str, float]] = {}
    step = 0
    for trial in range(60):
        per_image, kl, mu, logvar = _losses(model, x)
        optimizer.zero_grad()
        (per_image.mean() + kl.mean()).backward()
        args = {"recon": per_image.mean(), "kl": kl.mean(), "mu": mu, "logvar": logvar,
                "beta": 1.0, "total": per_image.mean() + kl.mean()}
        name = ["recon", "kl", "total", "beta", "mu", "logvar", "step"][trial % 7]
        pool = WRONG + RIGHT if name in ("recon", "kl", "total", "beta") else \
            [torch.ones(8), torch.ones(8, 4, 1), np.ones((8, 8)), "z", 3.0, torch.ones(7, 8),
             -1, 2.5, "3", None if name == "step" else torch.ones(8, 8, dtype=torch.int64)]
        value = pool[rng.integers(len(pool))]
        at = step
        if name == "step":
            at = value
        else:
            args[name] = value
        try:
            mon.after_backward(at, **args)
        except UserError as exc:
            assert name in str(exc), (name, value, str(exc))
            continue
        assert name != "step", value
        given = {k: float(np.asarray(v.detach() if isinstance(v, torch.Tensor) else v,
                                     dtype=np.float64).reshape(-1)[0])
                 for k, v in args.items() if k in ("recon", "kl", "total", "beta")}
        expected[step] = given
        optimizer.step()
        mon.after_step(step)
        step += 1
    mon.close()
    rows = vaediag.load_run(tmp_path / "run").scalars.set_index("step")
    assert len(rows) == step == len(expected) and step >= 15
    for s, given in expected.items():
        for column, value in given.items():
            recorded = rows.loc[s, column]
            assert (np.isnan(value) and np.isnan(recorded)) or \
                recorded == pytest.approx(value, rel=1e-6), (s, column)


def test_the_usual_call_is_checked_as_any_other():
    """after_backward's usual arguments (an int step, 0-d float tensors, a float beta, an int
    epoch) take a shorter check; it accepts exactly what the full check accepts, unchanged."""
    from vaediag.monitor.checks import StepInputs

    mu, logvar = torch.zeros(4, 3), torch.ones(4, 3)
    usual = dict(recon=torch.tensor(1.5), kl=torch.tensor(0.5), total=torch.tensor(2.0),
                 beta=0.5, epoch=2, mu=mu, logvar=logvar, kl_term=torch.tensor(0.25))
    fast = StepInputs.checked(7, **usual, columns=None, latent_dim=3)
    full = StepInputs.checked(7, **usual, columns={}, latent_dim=3)  # columns: the full check
    assert fast == full
    assert fast.recon is usual["recon"] and fast.mu is mu and fast.extra == {}
    for wrong, match in [(dict(mu=torch.zeros(4, 2), logvar=torch.zeros(4, 2)), "encode"),
                         (dict(logvar=torch.ones(4, 2)), "one shape"),
                         (dict(mu=torch.zeros(4, 3, dtype=torch.int64)), "float tensor"),
                         (dict(kl_term=torch.ones(2)), "kl_term"),
                         (dict(epoch=True), "epoch")]:
        with pytest.raises(UserError, match=match):
            StepInputs.checked(7, **{**usual, **wrong}, columns=None, latent_dim=3)


def test_the_monitor_shows_its_real_signature_and_documents_every_parameter():
    """``help()``, Jupyter and IDEs read ``inspect.signature``: every parameter is there with
    its annotation and default (no ``*args, **kwargs``), and the docstring names each one."""
    import inspect

    signature = inspect.signature(vaediag.Monitor)
    params = signature.parameters
    assert list(params)[:3] == ["run_dir", "model", "optimizer"]
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values())
    assert len(params) == 26
    assert all(p.annotation is not inspect.Parameter.empty for p in params.values())
    assert params["eval_images"].default is inspect.Parameter.empty
    assert params["eval_images"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["eval_every"].default == 100 and params["probes"].default == "standard"
    assert params["read_before_step"].default is True and params["online"].default is True
    doc = inspect.getdoc(vaediag.Monitor)
    documented = set()
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    for line in section.splitlines():
        if line and not line.startswith(" "):
            documented |= {name.strip() for name in line.split(",")}
    assert documented == set(params), set(params) ^ documented


def test_a_model_in_fsdp1s_wrapper_is_refused_in_any_world(tmp_path):
    """FSDP1 (``FullyShardedDataParallel``, also Lightning's FSDP strategy) holds flat
    parameters that are not the model's own: refused with the reason, by its class's name,
    in one process as on many (a stand-in class of that name: FSDP1 needs a process group)."""

    class FullyShardedDataParallel(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = TinyVAE(RES)
    wrapped = torch.nn.Sequential(FullyShardedDataParallel(inner))
    wrapped.encode, wrapped.decode = inner.encode, inner.decode
    with pytest.raises(UserError, match=r"wrapped in FullyShardedDataParallel \(FSDP1"):
        _monitor(tmp_path / "run", model=wrapped)
    assert not (tmp_path / "run").exists()
