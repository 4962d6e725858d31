"""Screenshot of the top of an HTML report in headless Chromium, for the README.

    python reports/screenshot.py reports/example.html reports/example.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    html, png = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    if shutil.which("chromium") is None:
        sys.exit("chromium not installed (Debian: apt-get install chromium); no screenshot")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--hide-scrollbars",
                        "--window-size=1200,1500", f"--screenshot={png.resolve()}",
                        html.as_uri()], check=True, capture_output=True, timeout=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
