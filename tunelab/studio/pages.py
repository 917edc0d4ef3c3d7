"""The HTML of `tunelab studio`: one layout (navigation, a `<main>` the page's script fills) for
every page. The pages' behaviour is static/studio.js, their look static/studio.css, and the
curves uPlot (static/uPlot.*, MIT, vendored: no Node build at install).
"""

from __future__ import annotations

import html

NAV = [("/", "Runs", "runs"), ("/new", "New run", "new"), ("/compare", "Compare", "compare"),
       ("/play", "Playground", "play"), ("/reviews", "Reviews", "reviews")]  # fmt: skip

LAYOUT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · tunelab studio</title>
<link rel="stylesheet" href="/static/uPlot.min.css">
<link rel="stylesheet" href="/static/studio.css">
</head>
<body data-page="{page}">
<header><a class="brand" href="/">tunelab studio</a><nav>{nav}</nav></header>
<main id="app"><h1 id="title">{title}</h1><div id="content"></div></main>
<script src="/static/uPlot.iife.min.js"></script>
<script src="/static/studio.js"></script>
</body>
</html>
"""


def page(name: str, title: str) -> str:
    """The page `name` (runs, run, new, compare, job, play, reviews) with its title."""
    nav = "".join(
        f'<a href="{href}"{" class=here" if key == name else ""}>{label}</a>' for href, label, key in NAV
    )
    return LAYOUT.format(title=html.escape(title), page=name, nav=nav)
