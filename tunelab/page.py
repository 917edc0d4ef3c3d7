"""The page `tunelab serve` shows at `/`: a text box, a button, and the answer (label scores,
entities, a value, or streamed text). Plain HTML and JavaScript, no build step; `?q=TEXT` fills
the box and sends it (a link that shows an answer). When the server logs answers (`--log`), each
answer gets thumbs up and down and a box for the corrected answer (or label), sent to
`/v1/feedback`."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tunelab</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; } .muted { color: #666; font-size: 0.9rem; }
  textarea { width: 100%; min-height: 6rem; font: inherit; padding: 0.5rem; box-sizing: border-box; }
  input { font: inherit; padding: 0.3rem; width: 100%; box-sizing: border-box; }
  button { font: inherit; padding: 0.4rem 1.2rem; margin-top: 0.5rem; cursor: pointer; }
  #answer { white-space: pre-wrap; border: 1px solid #ddd; border-radius: 4px; padding: 0.75rem; margin-top: 1rem; min-height: 2rem; }
  .bar { background: #4a7bd0; height: 0.6rem; border-radius: 2px; }
  table { border-collapse: collapse; width: 100%; } td { padding: 0.2rem 0.4rem; vertical-align: middle; }
</style>
</head>
<body>
<h1>tunelab &middot; <span id="model"></span></h1>
<p class="muted" id="about"></p>
<form id="form">
  <p id="keyrow" hidden><label>API key <input id="key" type="password" autocomplete="off"></label></p>
  <textarea id="text" placeholder="Type here" required></textarea>
  <button id="send" type="submit">Send</button> <span class="muted" id="status"></span>
</form>
<div id="answer"></div>
<div id="feedback" hidden>
  <button id="up" type="button" title="a good answer">&#128077;</button>
  <button id="down" type="button" title="a bad answer">&#128078;</button>
  <input id="correction" placeholder="the right answer (optional)">
  <button id="send-correction" type="button">Send correction</button>
  <span class="muted" id="thanks"></span>
</div>
<script>
const CONFIG = __CONFIG__;
const $ = (id) => document.getElementById(id);
$("model").textContent = CONFIG.model;
$("about").textContent = {
  "classification": "Classifies the text: label scores below.",
  "token-classification": "Finds the entities in the text.",
  "regression": "Predicts a value for the text.",
  "causal-lm": "Chat with the model: the answer streams in.",
  "seq2seq": "Generates the target text for your input.",
}[CONFIG.task] || "";
if (CONFIG.auth) $("keyrow").hidden = false;

function headers() {
  const h = {"Content-Type": "application/json"};
  if (CONFIG.auth) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : r.statusText); }
  return r;
}

let answerId = null;

async function stream(path, body, show) {
  const r = await post(path, {...body, stream: true});
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\\n\\n"); buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      answerId = chunk.id;
      const choice = chunk.choices[0];
      text += (choice.delta ? choice.delta.content : choice.text) || "";
      show(text);
    }
  }
}

async function run(text) {
  const answer = $("answer");
  answer.innerHTML = ""; $("status").textContent = "working...";
  answerId = null; $("feedback").hidden = true; $("thanks").textContent = ""; $("correction").value = "";
  try {
    if (CONFIG.task === "causal-lm") {
      await stream("/v1/chat/completions", {messages: [{role: "user", content: text}]}, (t) => answer.textContent = t);
    } else if (CONFIG.task === "seq2seq") {
      await stream("/v1/completions", {prompt: text}, (t) => answer.textContent = t);
    } else {
      const path = {"classification": "/v1/classify", "token-classification": "/v1/entities", "regression": "/v1/predict"}[CONFIG.task];
      const response = await (await post(path, {input: text})).json();
      answerId = response.id || null;
      const result = response.data[0];
      if (result.probabilities) {
        const rows = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
        answer.innerHTML = "<table id='scores'>" + rows.map(([label, p]) =>
          `<tr><td class="label">${esc(label)}</td><td>${p.toFixed(3)}</td><td style="width:60%"><div class="bar" style="width:${(100 * p).toFixed(1)}%"></div></td></tr>`).join("") + "</table>";
      } else if (result.entities) {
        answer.innerHTML = result.entities.length ? "<table id='entities'>" + result.entities.map((e) =>
          `<tr><td>${esc(e.text)}</td><td>${esc(e.type)}</td><td>${e.start}-${e.end}</td></tr>`).join("") + "</table>" : "(no entities)";
      } else {
        answer.textContent = String(result.value);
      }
    }
    $("status").textContent = "done";
    if (CONFIG.feedback && answerId) $("feedback").hidden = false;
  } catch (e) {
    answer.textContent = "Error: " + e.message; $("status").textContent = "failed";
  }
}

async function feedback(body) {
  $("thanks").textContent = "sending...";
  try {
    await post("/v1/feedback", {id: answerId, ...body});
    $("thanks").textContent = "thanks: feedback saved";
  } catch (e) { $("thanks").textContent = "Error: " + e.message; }
}
$("up").addEventListener("click", () => feedback({rating: "up"}));
$("down").addEventListener("click", () => feedback({rating: "down"}));
$("send-correction").addEventListener("click", () =>
  feedback({rating: "down", correction: $("correction").value}));
$("form").addEventListener("submit", (e) => { e.preventDefault(); run($("text").value); });
const q = new URLSearchParams(location.search).get("q");
if (q) { $("text").value = q; $("send").click(); }
</script>
</body>
</html>
"""
