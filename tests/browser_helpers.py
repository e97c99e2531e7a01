"""A real headless Chromium for the tests that open tide's HTML reports (skipped where none is installed;
.ci/run installs Debian's `chromium`)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

# Appended to a copy of a page (beside it, so that its relative links hold): after load, write what the
# test needs into the DOM, which --dump-dom prints.
CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const th = document.querySelectorAll("#latents th")[1];
  if (th) th.click();  // sort by frequency, largest first
  const rows = Array.from(document.querySelectorAll("#latents tbody tr"));
  const out = document.createElement("pre");
  out.id = "tide-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute("src")),
    rows: rows.length,
    freqs: rows.map(r => parseFloat(r.children[1].dataset.v)),
  });
  document.body.appendChild(out);
});
</script>
"""


BASE = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
BASE += ["--hide-scrollbars", "--force-device-scale-factor=1"]


def browse(page: Path, check: str = CHECK, window: tuple[int, int] = (1280, 1024)) -> dict:
    """The JSON that `check` (a <script> writing it into <pre id="tide-check">) finds on `page` once loaded."""
    probe = page.with_name("_check_" + page.name)
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    cmd = [*BASE, f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=10000"]
    dom = subprocess.run(
        [*cmd, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    probe.unlink()
    found = re.search(r'<pre id="tide-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; chromium printed: {dom[:500]}"
    return json.loads(html.unescape(found[1]))


def screenshot(page: Path, png: Path, window: tuple[int, int]) -> Path:
    """`page` as Chromium draws it in a `window` (width, height) viewport, saved to `png`."""
    cmd = [*BASE, f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=10000"]
    subprocess.run([*cmd, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert png.is_file(), f"chromium wrote no screenshot of {page}"
    return png
