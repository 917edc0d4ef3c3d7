"""The review page: one prompt at a time with two answers, in an order drawn per reviewer and
item (so reviewers see no pattern and the page never says which model wrote which), with
buttons for answer 1, answer 2, a tie, or skip, an optional 1-5 score and a comment. Every rating
is stored at once, so closing the page loses nothing; reopening it resumes where the reviewer was.

It binds 127.0.0.1 unless told otherwise; it reads nothing but its own database."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.review.store import Review

NAME = Field(min_length=1, max_length=40, pattern=r"^[\w .@-]+$")


class Rating(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: int
    reviewer: str = NAME
    pick: Literal["1", "2", "tie", "skip"]
    score: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)


def swapped(seed: str, item: int, reviewer: str) -> bool:
    """Whether answer 1 on this reviewer's page is B: a fair coin, fixed per (review, item, reviewer)."""
    return hashlib.sha256(f"{seed}:{item}:{reviewer}".encode()).digest()[0] % 2 == 1


def create_review_app(folder: str | Path, reviewer: str | None = None) -> FastAPI:
    """The FastAPI app of the review in `folder`."""
    review = Review(folder)
    seed = review.meta()["created"]
    app = FastAPI(title="tunelab review", docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.replace("__CONFIG__", json.dumps({"reviewer": reviewer or ""}))

    @app.get("/api/next")
    async def next_item(
        reviewer: str = Query(min_length=1, max_length=40, pattern=r"^[\w .@-]+$"),
    ) -> dict[str, Any]:
        item = review.next_item(reviewer)
        done, total = review.progress(reviewer)
        if item is None:
            return {"done": done, "total": total, "item": None}
        first, second = (
            (item.answer_b, item.answer_a)
            if swapped(seed, item.id, reviewer)
            else (item.answer_a, item.answer_b)
        )
        return {
            "done": done,
            "total": total,
            "item": {"id": item.id, "prompt": item.prompt, "answers": [first, second]},
        }

    @app.post("/api/rate")
    async def rate(rating: Rating) -> dict[str, Any]:
        if rating.item not in {i.id for i in review.items()}:
            raise HTTPException(404, f"item {rating.item}: no such item in this review")
        choice = {"tie": "tie", "skip": "skip"}.get(rating.pick)
        if choice is None:
            b_first = swapped(seed, rating.item, rating.reviewer)
            choice = "b" if (rating.pick == "1") == b_first else "a"
        review.rate(rating.item, rating.reviewer, choice, rating.score, rating.comment)
        done, total = review.progress(rating.reviewer)
        return {"done": done, "total": total}

    return app


def run_review_app(folder: str | Path, host: str, port: int, reviewer: str | None) -> None:
    app = create_review_app(folder, reviewer)
    print(
        f"tunelab: review page on http://{host}:{port}/ (Ctrl+C to stop; ratings are saved as you go)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tunelab review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; } .muted { color: #666; font-size: 0.9rem; }
  #prompt { white-space: pre-wrap; background: #f4f6fa; border-radius: 4px; padding: 0.75rem; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin: 1rem 0; }
  .answer { white-space: pre-wrap; border: 1px solid #ccd; border-radius: 4px; padding: 0.75rem; min-height: 4rem; }
  button { font: inherit; padding: 0.4rem 1.1rem; margin: 0.2rem 0.4rem 0.2rem 0; cursor: pointer; }
  input, select, textarea { font: inherit; padding: 0.3rem; }
  textarea { width: 100%; box-sizing: border-box; min-height: 3rem; }
</style>
</head>
<body>
<h1>tunelab review</h1>
<p class="muted">Which answer is better? The two models are shown in a random order; you are not told which is which.</p>
<p id="who"><label>Your name <input id="reviewer" maxlength="40"></label> <button id="start">Start</button></p>
<div id="work" hidden>
  <p class="muted" id="progress"></p>
  <div id="prompt"></div>
  <div class="answers"><div><b>Answer 1</b><div class="answer" id="answer1"></div></div>
                       <div><b>Answer 2</b><div class="answer" id="answer2"></div></div></div>
  <p><label>Score of the better answer (optional)
    <select id="score"><option value="">-</option><option>1</option><option>2</option><option>3</option><option>4</option><option>5</option></select></label></p>
  <p><textarea id="comment" placeholder="Comment (optional)"></textarea></p>
  <p><button id="pick1">1 is better</button><button id="pick2">2 is better</button>
     <button id="tie">Tie</button><button id="skip">Skip</button></p>
</div>
<p id="status"></p>
<script>
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
let current = null;
// relative URLs and the studio's CSRF cookie (when any): the page also runs inside `tunelab studio`, under /review/<name>/
const csrf = (document.cookie.match(/(?:^|; )tunelab_studio_csrf=([^;]*)/) || [])[1] || "";
$("reviewer").value = new URLSearchParams(location.search).get("reviewer") || CONFIG.reviewer;

async function next() {
  const r = await fetch("api/next?reviewer=" + encodeURIComponent($("reviewer").value));
  if (!r.ok) { $("status").textContent = "Error: give a name (letters, digits, spaces, . @ - _)"; return; }
  const data = await r.json();
  $("progress").textContent = `${data.done} of ${data.total} done`;
  current = data.item;
  if (!current) { $("work").hidden = true; $("status").textContent = `All ${data.total} items done. Thank you.`; return; }
  $("who").hidden = true; $("work").hidden = false; $("status").textContent = "";
  $("prompt").textContent = current.prompt;
  $("answer1").textContent = current.answers[0];
  $("answer2").textContent = current.answers[1];
  $("score").value = ""; $("comment").value = "";
}

async function rate(pick) {
  const body = {item: current.id, reviewer: $("reviewer").value, pick: pick,
                score: $("score").value ? Number($("score").value) : null, comment: $("comment").value || null};
  const r = await fetch("api/rate", {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
  if (!r.ok) { $("status").textContent = "Error: " + (await r.text()); return; }
  await next();
}

$("start").addEventListener("click", next);
$("pick1").addEventListener("click", () => rate("1"));
$("pick2").addEventListener("click", () => rate("2"));
$("tie").addEventListener("click", () => rate("tie"));
$("skip").addEventListener("click", () => rate("skip"));
if ($("reviewer").value) next();
</script>
</body>
</html>
"""
