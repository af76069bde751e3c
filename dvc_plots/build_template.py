"""Build ``dvc_plots/template.html``: DVC's HTML page with vega inlined.

``dvc plots show`` fills an HTML template: ``{plot_divs}`` receives the
charts, and ``{scripts}`` (when present) receives ``<script src=...>`` tags
pointing at a CDN, which leaves a blank page offline. This template has no
``{scripts}`` placeholder; instead the three vendored libraries in
``vendor/`` are pasted inline, so the generated page renders with no network
and wherever ``-o`` puts it (relative ``src=`` links would break outside
this folder).

Run ``python dvc_plots/build_template.py`` after updating ``vendor/``
(see ``vendor/VENDORED.md``); ``--check`` exits 1 when the template is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "vendor"
TEMPLATE = HERE / "template.html"
# load order matters: vega-lite needs vega, vega-embed needs both
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
# DVC replaces these with str.replace over the whole page, so no library may contain them
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>cnnpipe plots</title>
<!-- Offline template for `dvc plots show` (see dvc_plots/build_template.py).
     vega, vega-lite and vega-embed are inlined below (BSD-3-Clause,
     dvc_plots/vendor/LICENSE); no script is loaded from the network. -->
<style>
  body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
  h1 { font-size: 20px; font-weight: 600; }
  body > div[id] { display: inline-block; vertical-align: top; margin: 0 24px 24px 0; }
  table { border-spacing: 15px; }
</style>
"""

TAIL = """</head>
<body>
<h1>cnnpipe &mdash; DVC plots</h1>
{plot_divs}
</body>
</html>
"""


def build() -> str:
    """The template text: head, the inlined libraries, the body with ``{plot_divs}``."""
    parts = [HEAD]
    for name in SCRIPTS:
        source = (VENDOR / name).read_text(encoding="utf-8")
        if "</script" in source.lower():
            raise SystemExit(f"{name} contains '</script': it cannot be inlined safely")
        for placeholder in DVC_PLACEHOLDERS:
            if placeholder in source:
                raise SystemExit(f"{name} contains DVC's {placeholder} placeholder: it cannot be inlined safely")
        digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
        parts.append(f"<!-- vendor/{name} sha256={digest} -->\n<script>\n{source.rstrip()}\n</script>\n")
    parts.append(TAIL)
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if template.html is not up to date")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        current = TEMPLATE.read_text(encoding="utf-8") if TEMPLATE.exists() else ""
        if current != text:
            print(f"{TEMPLATE} is stale; run python dvc_plots/build_template.py", file=sys.stderr)
            return 1
        return 0
    TEMPLATE.write_text(text, encoding="utf-8")
    print(f"wrote {TEMPLATE} ({len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
