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


def browse(page: Path) -> dict:
    probe = page.with_name("_check_" + page.name)
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    cmd += ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    probe.unlink()
    found = re.search(r'<pre id="tide-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; chromium printed: {dom[:500]}"
    return json.loads(html.unescape(found[1]))
