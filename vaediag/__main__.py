"""``python -m vaediag`` is the ``vaediag`` command."""

from vaediag.cli import run

if __name__ == "__main__":
    run()
