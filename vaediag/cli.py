"""Command line: thin click commands over the library. ``vaediag --help`` lists them.

Exit codes: 0 done; 1 findings at or above ``analyze --fail-on``; 2 bad input (one line on
stderr, no traceback); 3 training stopped by the non-finite policy; 130 interrupted (the run
dir is checkpointed and can be resumed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from vaediag import __version__, inject, probes
from vaediag.errors import TrainingStopped, UserError
from vaediag.severities import SEVERITIES

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130


def _err(message: str) -> None:
    click.echo(f"vaediag: error: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vaediag")
def cli() -> None:
    """vaediag: training diagnostics for VAE instability.

    Train a VAE with probes recording what matters at every step (vaediag train), then find
    where training went unstable and where the loss stopped tracking image quality (vaediag
    analyze RUN_DIR).
    """


def _config_options(f):
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override one config key, e.g. --set optim.lr=3e-4 --set "
                          "model.channels=[16,32]. Values are TOML; bare words are strings. "
                          "Repeatable; 'vaediag config' lists every key.")(f)
    f = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     metavar="FILE.toml",
                     help="A TOML config file (sections [data], [model], [loss], [optim], "
                          "[train], [eval], [log]), applied over the preset.")(f)
    f = click.option("--preset", type=click.Choice(_preset_names()), default=None,
                     help="A named starting configuration (default: 'default'): "
                          + "; ".join(f"'{k}': {v}" for k, v in _preset_help().items())
                          + ".")(f)
    return f


def _preset_names() -> list[str]:
    from vaediag.presets import PRESETS

    return list(PRESETS)


def _preset_help() -> dict[str, str]:
    from vaediag.presets import PRESET_HELP

    return PRESET_HELP


@cli.command()
@_config_options
@click.option("--data", metavar="SOURCE",
              help="'toyfaces' (built in, offline: procedural faces with known factors), a folder "
                   "of images (searched recursively), or a .npz/.npy image array. Same as --set "
                   "data.source=SOURCE.")
@click.option("--out", "out", type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Run directory to write. Default: runs/run-N, the first that does not exist. "
                   "A non-empty RUN_DIR is refused unless --resume or --overwrite is given.")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Train for N optimizer steps (overrides --epochs and train.epochs).")
@click.option("--epochs", type=click.IntRange(min=1), metavar="N",
              help="Train for N epochs of the training set.")
@click.option("--resume", is_flag=True,
              help="Continue RUN_DIR from its last checkpoint with its saved config: step numbers "
                   "continue, nothing is duplicated. --steps/--epochs extend it; --set may change "
                   "optimizer, loss-weight and logging keys.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing run directory at RUN_DIR (only a vaediag run directory).")
@click.option("--device", metavar="auto|cpu|cuda|cuda:N|mps",
              help="Where to train (default auto: cuda, then mps, then cpu).")
@click.option("--seed", type=int, metavar="N",
              help="Training seed: initialisation, data order, sampling, the grid's fixed z "
                   "(data.seed fixes the data and its split separately).")
@click.option("--probes", "probe_preset", type=click.Choice(list(probes.PRESETS)),
              help="What to record beyond the losses (default standard; docs/probes.md): "
                   + "; ".join(f"'{k}': {v}" for k, v in probes.PRESETS.items())
                   + ". Same as --set probes.preset=...")
@click.option("--probe", "probe_specs", multiple=True, metavar="FILE.py:ClassName",
              help="Load an extra probe from a Python file, e.g. --probe "
                   "probes/decoder_saturation.py:DecoderSaturation. Repeatable.")
@click.option("--lpips-weights", type=click.Path(dir_okay=False), metavar="PATH",
              help="torchvision's AlexNet ImageNet weights (alexnet-owt-7be5be79.pth) for LPIPS, "
                   "for machines that cannot download them. Default: the torch hub cache.")
@click.option("--inject", "faults", multiple=True, metavar="KIND@STEP[:k=v,...]",
              help="Plant a known fault, e.g. --inject lr_spike@600:factor=10,steps=20 (kinds: "
                   + ", ".join(inject.KINDS) + "; docs/detectors.md). Recorded in the run as "
                   "ground truth. Repeatable.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: only when stderr is a terminal; otherwise "
                   "a log line every 5% of the run).")
def train(preset: str | None, config_file: str | None, overrides: tuple[str, ...],
          data: str | None, out: str | None, steps: int | None, epochs: int | None,
          resume: bool, overwrite: bool, device: str | None, seed: int | None,
          probe_preset: str | None, probe_specs: tuple[str, ...], lpips_weights: str | None,
          faults: tuple[str, ...], progress: bool | None) -> None:
    """Train a VAE on DATA and record everything into RUN_DIR.

    Per-step losses and what the probes record (gradients per layer, Adam's state, latent
    statistics; --probes picks how much) go to RUN_DIR/scalars; at every evaluation (default once
    per epoch) the 4x8 grid (8 validation images, their reconstructions, decode(0), decode of 8
    fixed z) with its losses and image-quality metrics goes to RUN_DIR/grids and RUN_DIR/evals.
    Read it with vaediag.load_run(RUN_DIR).

    \b
    Examples:
      vaediag train --out runs/first                      # toyfaces, 64 px, 10 epochs
      vaediag train --data ~/anime-faces --epochs 30 --out runs/anime
      vaediag train --preset tiny --out runs/smoke --set optim.lr=1e-3
      vaediag train --out runs/first --resume --epochs 20 # continue to 20 epochs
      torchrun --nproc_per_node 4 -m vaediag train --out runs/big  # DDP, 4 ranks
    """
    from vaediag.config import build_config
    from vaediag.trainer import default_run_dir
    from vaediag.trainer import train as run_training

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    flags = _train_flags(data=data, steps=steps, epochs=epochs, device=device, seed=seed,
                         probe_preset=probe_preset, probe_specs=probe_specs, faults=faults,
                         lpips_weights=lpips_weights)
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        if preset or config_file:
            raise click.UsageError("--resume continues with the run's saved config; use --set "
                                   "to change keys, not --preset or --config")
        from vaediag.rundir import load_run

        config = build_config(base=load_run(out).config, overrides=overrides, values=flags)
        run_dir = Path(out)
    else:
        config = build_config(preset=preset, file=config_file, overrides=overrides, values=flags)
        run_dir = Path(out) if out else default_run_dir()

    started = time.monotonic()
    result = run_training(config, run_dir, resume=resume, overwrite=overwrite,
                          progress=progress,
                          on_start=lambda path: click.echo(f"run directory: {path}"))
    took = time.monotonic() - started
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for the run
        return
    _exit_if_interrupted(result, run_dir)
    click.echo(f"trained to step {result.step:,} in {took:.0f} s; grids in {run_dir / 'grids'}")
    click.echo(f"run directory: {run_dir}")


def _train_flags(*, data: str | None, steps: int | None, epochs: int | None,
                 device: str | None, seed: int | None, probe_preset: str | None,
                 probe_specs: tuple[str, ...], faults: tuple[str, ...],
                 lpips_weights: str | None) -> dict[str, Any]:
    """The configuration keys ``vaediag train``'s own options set."""
    if lpips_weights is not None and not Path(lpips_weights).is_file():
        raise UserError(f"--lpips-weights {lpips_weights}: no such file")
    given = {"data.source": data, "train.steps": steps, "train.device": device,
             "train.seed": seed, "probes.preset": probe_preset,
             "probes.extra": list(probe_specs) or None, "train.inject": list(faults) or None,
             "probes.lpips_weights": lpips_weights}
    flags = {key: value for key, value in given.items() if value is not None}
    if epochs is not None:
        flags.update({"train.steps": 0, "train.epochs": epochs})
    return flags


def _exit_if_interrupted(result, run_dir) -> None:
    """A run stopped by a signal: say how to continue it, exit 130."""
    if result.status == "interrupted":
        click.echo(f"interrupted at step {result.step:,} of {result.total_steps:,} (checkpoint "
                   f"saved); continue with: vaediag train --out {run_dir} --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


@cli.command()
@click.argument("run_dir", type=click.Path(), metavar="RUN_DIR")
@click.option("--json", "as_json", is_flag=True,
              help="Print the findings as JSON (the content of findings.json) instead of the "
                   "summary.")
@click.option("--fail-on", type=click.Choice(list(SEVERITIES)), default=None,
              help="Exit with code 1 when a finding of this severity or worse exists (for CI).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Where to write the HTML report. Default: RUN_DIR/report.html.")
@click.option("--pdf", "pdf_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Where to write the PDF report. Default: RUN_DIR/report.pdf.")
@click.option("--no-html", is_flag=True, help="Do not write the HTML report.")
@click.option("--no-pdf", is_flag=True, help="Do not write the PDF report.")
@click.option("--no-write", is_flag=True,
              help="Write nothing into RUN_DIR (no findings.json, and reports only where "
                   "--html or --pdf name a path): for a read-only run directory.")
@click.option("--verify", is_flag=True,
              help="Test each warning or high finding's first concrete remedy by experiment: "
                   "replay it from the checkpoint before the finding (into RUN_DIR/replays) "
                   "and report whether the finding and the quality loss are gone, with the "
                   "numbers. Trains: minutes, not seconds.")
@click.option("--verify-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              metavar="N", help="Replay at most N steps per finding.")
@click.option("--follow", is_flag=True,
              help="Follow a run in progress: analyse each new evaluation as it is written and "
                   "print each new warning or high finding as one line; when the run ends, "
                   "analyse it whole as without --follow.")
def analyze(run_dir: str, as_json: bool, fail_on: str | None, html_path: str | None,
            pdf_path: str | None, no_html: bool, no_pdf: bool, no_write: bool, verify: bool,
            verify_steps: int, follow: bool) -> int:
    """Find where training went unstable and where the loss stopped tracking image quality.

    Reads only RUN_DIR (no model, no torch; a run that crashed or is still training works),
    prints each finding with its severity, steps and remedy, and writes RUN_DIR/findings.json
    and the reports RUN_DIR/report.html (one self-contained file) and RUN_DIR/report.pdf.
    With --verify it also replays remedies from the run's checkpoints (that needs torch).
    Exit code 0 even with findings, unless --fail-on says otherwise.
    """
    import json as json_module

    from vaediag.analysis import FINDINGS_JSON, findings_json, verdict, write_findings
    from vaediag.analysis import analyze as run_analysis
    from vaediag.analysis.findings import severity_rank
    from vaediag.analysis.summary import render

    if follow:
        from vaediag.analysis.follow import follow as follow_run
        from vaediag.rundir import load_run

        load_run(run_dir)  # a missing or corrupt run directory: one line, exit 2
        click.echo(f"following {run_dir}: each new warning or high finding as it appears",
                   err=True)
        follow_run(run_dir, lambda text: click.echo(text, err=True))
    result = run_analysis(run_dir)
    if verify:
        from vaediag.verify import verify as run_verify

        result.verification = [v.to_json() for v in run_verify(
            result, run_dir, write=not no_write, max_steps=verify_steps)]
    written: list[str] = []
    if not no_write:
        target = Path(run_dir) / FINDINGS_JSON
        try:
            write_findings(result, target)
            written.append(str(target))
        except OSError as exc:
            click.echo(f"vaediag: warning: cannot write {target}: {exc.strerror or exc}",
                       err=True)
    default = None if no_write else Path(run_dir)
    html = None if no_html else html_path or (default and default / "report.html")
    pdf = None if no_pdf else pdf_path or (default and default / "report.pdf")
    if html or pdf:
        from vaediag.report import write_reports

        for path in (html, pdf):
            if path and not Path(path).resolve().parent.is_dir():
                raise UserError(f"cannot write {path}: no such directory")
        try:
            written += [str(p) for p in write_reports(run_dir, result, html=html, pdf=pdf)]
        except OSError as exc:
            click.echo(f"vaediag: warning: cannot write the report: {exc.strerror or exc}",
                       err=True)
    if as_json:
        click.echo(json_module.dumps(findings_json(result), indent=2))
    else:
        click.echo(render(result, verdict(result), written))
    if fail_on and result.worst and severity_rank(result.worst) >= severity_rank(fail_on):
        return EXIT_FINDINGS
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(), metavar="RUN_DIR")
@click.option("--from", "from_step", type=click.IntRange(min=0), required=True, metavar="STEP",
              help="Start from RUN_DIR's checkpoint at or before this step (by default there "
                   "is one at every evaluation).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A setting to change, as in 'vaediag train --set', e.g. optim.name=sgd, "
                   "optim.lr=1e-4, optim.eps=1e-6, optim.grad_clip=100, loss.free_bits=0.5, "
                   "loss.beta=1. Keys that fix the data, the model or the data order are "
                   "refused. Repeatable.")
@click.option("--out", "out", type=click.Path(file_okay=False), required=True,
              metavar="BRANCH", help="The new run directory (must not exist).")
@click.option("--steps", type=click.IntRange(min=1), metavar="N",
              help="Train N steps after the checkpoint (default: to the parent run's end).")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: only when stderr is a terminal).")
def replay(run_dir: str, from_step: int, overrides: tuple[str, ...], out: str,
           steps: int | None, progress: bool | None) -> None:
    """Continue RUN_DIR from a checkpoint with changed settings, as a new run BRANCH.

    BRANCH holds RUN_DIR as it was at the checkpoint, then training with the changes, with the
    same data order and noise: with no changes it repeats RUN_DIR step for step, so whatever
    differs is the changes' doing. Analyse it like any run, and set it beside its parent with
    'vaediag compare RUN_DIR BRANCH'.

    \b
    Examples:
      vaediag replay runs/a --from 3000 --set optim.name=sgd --set optim.lr=0.01 --out runs/a-sgd
      vaediag replay runs/a --from 3000 --set optim.eps=1e-6 --steps 1000 --out runs/a-eps
    """
    from vaediag.replay import replay as run_replay

    started = time.monotonic()
    result = run_replay(run_dir, from_step, out, overrides=overrides, steps=steps,
                        progress=progress)
    took = time.monotonic() - started
    _exit_if_interrupted(result, out)
    click.echo(f"replayed to step {result.step:,} in {took:.0f} s into {out}; compare with: "
               f"vaediag compare {run_dir} {out}")


@cli.command()
@click.argument("runs", nargs=-1, type=click.Path(), metavar="RUN_DIR RUN_DIR [...]")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), metavar="PATH",
              default="compare.html", show_default=True, help="Where to write the HTML report.")
@click.option("--pdf", "pdf_path", type=click.Path(dir_okay=False), metavar="PATH",
              default="compare.pdf", show_default=True, help="Where to write the PDF report.")
@click.option("--no-html", is_flag=True, help="Do not write the HTML report.")
@click.option("--no-pdf", is_flag=True, help="Do not write the PDF report.")
def compare(runs: tuple[str, ...], html_path: str, pdf_path: str, no_html: bool,
            no_pdf: bool) -> None:
    """Set runs side by side in one report: a run and its replays, or any runs.

    Losses and image quality overlaid on the same step axis (dotted where a replay branched
    off), the grids side by side at the same steps, each run's settings where they differ from
    the first run's, its verdict and its findings. Writes nothing into the run directories.

    \b
    Example:
      vaediag compare runs/anime runs/anime-sgd runs/anime-eps --html anime.html --pdf anime.pdf
    """
    from vaediag.report.compare import write_comparison

    if len(runs) < 2:
        raise click.UsageError("give at least two run directories to compare")
    html = None if no_html else Path(html_path)
    pdf = None if no_pdf else Path(pdf_path)
    for path in (html, pdf):
        if path and not path.resolve().parent.is_dir():
            raise UserError(f"cannot write {path}: no such directory")
    for path in write_comparison(list(runs), html=html, pdf=pdf):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("run_dir", type=click.Path(), metavar="RUN_DIR")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False),
              required=True, metavar="DIR",
              help="Write TensorBoard event files to DIR/<run name> (view with tensorboard "
                   "--logdir DIR). Needs the tensorboard package: pip install "
                   "'vaediag[tensorboard]'.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export of this run in DIR.")
def export(run_dir: str, tensorboard_dir: str, overwrite: bool) -> None:
    """Export RUN_DIR for TensorBoard: every recorded column as a scalar (train/..., eval/...),
    each evaluation's grid as an image, the findings (when analysed) and the config as text."""
    from vaediag.export import to_tensorboard

    done = to_tensorboard(run_dir, tensorboard_dir, overwrite=overwrite)
    click.echo(f"wrote {done['scalars']:,} scalars and {done['images']:,} grids to "
               f"{done['folder']}")


@cli.command("toyfaces")
@click.argument("out_dir", type=click.Path(file_okay=False), metavar="OUT_DIR")
@click.option("-n", "--count", type=click.IntRange(min=1), default=64, show_default=True,
              help="How many faces to write.")
@click.option("--resolution", type=click.IntRange(8, 512), default=64, show_default=True,
              help="Image size in pixels.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Generator seed (the training set of data.seed = N is seed N, stream 0).")
def toyfaces_command(out_dir: str, count: int, resolution: int, seed: int) -> None:
    """Write toyfaces images as PNGs with their known factors in OUT_DIR/factors.csv.

    The same faces that 'vaediag train' generates in memory with data.seed = SEED, the first
    COUNT of its training set. OUT_DIR must not exist or be empty. The folder trains like any
    other: vaediag train --data OUT_DIR.
    """
    from vaediag.data.toyfaces import export
    from vaediag.errors import DataError

    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DataError(f"{path} exists and is not an empty folder; choose another OUT_DIR")
    csv = export(path, count, resolution, seed)
    click.echo(f"wrote {count} faces and {csv}")


@cli.command("config")
@_config_options
@click.option("--markdown", is_flag=True,
              help="Print the reference table of every key and default instead (the one in "
                   "docs/configuration.md).")
def show_config(preset: str | None, config_file: str | None, overrides: tuple[str, ...],
                markdown: bool) -> None:
    """Print the resolved configuration as TOML, each key with its meaning.

    Save the output as a file, edit it, and pass it back with 'vaediag train --config FILE'.
    """
    from vaediag.config import annotated_toml, build_config, reference_markdown

    config = build_config(preset=preset, file=config_file, overrides=overrides)
    click.echo(reference_markdown() if markdown else annotated_toml(config), nl=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vaediag`` command; returns the exit code."""
    try:
        result = cli.main(args=argv, prog_name="vaediag", standalone_mode=False)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "vaediag"
        _err(f"{exc.format_message()} (see '{where} --help')")
        return EXIT_BAD_INPUT
    except click.ClickException as exc:
        _err(exc.format_message())
        return EXIT_BAD_INPUT
    except click.Abort:
        return EXIT_INTERRUPTED
    except UserError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except TrainingStopped as exc:
        click.echo(f"vaediag: {exc}", err=True)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        click.echo("vaediag: aborted", err=True)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
