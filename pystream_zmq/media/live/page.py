"""The live view's page: self-contained (no external assets, so it works offline and
leaks nothing), the stream in an <img>, and a table that fetch() refreshes from
/stats.json every half second. Text goes in with textContent only, never as HTML."""

from __future__ import annotations

import html

REFRESH_MS = 500

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ font: 14px system-ui, sans-serif; margin: 1em; background: #fafafa; color: #222; }}
  h1 {{ font-size: 1.2em; margin: 0 0 .5em; }}
  #frame {{ display: block; max-width: 100%; min-width: 160px; min-height: 120px;
            background: #ddd; }}
  #summary {{ margin: .5em 0; }}
  table {{ border-collapse: collapse; }}
  th, td {{ padding: .2em .8em; border-bottom: 1px solid #ccc; }}
  td:not(:first-child), th:not(:first-child) {{ text-align: right;
                                               font-variant-numeric: tabular-nums; }}
  .stale {{ color: #a00; }}
</style>
</head>
<body>
<h1>{title}</h1>
<img id="frame" src="stream.mjpg" alt="the latest frame">
<p id="summary">waiting for the first figures</p>
<table id="stages">
  <thead><tr><th>stage</th><th>items/s</th><th>p95 ms</th><th>dropped</th><th>errors</th>
  </tr></thead>
  <tbody></tbody>
</table>
<script>
"use strict";
const summary = document.getElementById("summary");
const body = document.querySelector("#stages tbody");

function figure(value, digits) {{
  return value === null || value === undefined ? "-" : value.toFixed(digits);
}}

function render(stats) {{
  summary.className = "";
  summary.textContent = stats.frames + " frames shown, " + figure(stats.fps, 1) +
    " frames/s" + (stats.error ? "; figures: " + stats.error : "");
  const rows = stats.stages.map((stage) => {{
    const tr = document.createElement("tr");
    const cells = [stage.stage, figure(stage.items_per_s, 1), figure(stage.p95_ms, 2),
                   String(stage.dropped), String(stage.errors)];
    for (const text of cells) {{
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }}
    return tr;
  }});
  body.replaceChildren(...rows);
}}

async function refresh() {{
  try {{
    const response = await fetch("stats.json", {{cache: "no-store"}});
    render(await response.json());
  }} catch (error) {{
    summary.className = "stale";
    summary.textContent = "the live view does not answer (" + error + ")";
  }}
  setTimeout(refresh, {refresh_ms});
}}
refresh();
</script>
</body>
</html>
"""


def render(title: str) -> bytes:
    return _PAGE.format(title=html.escape(title), refresh_ms=REFRESH_MS).encode()
