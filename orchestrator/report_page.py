"""report.html's frame: styles, the figure blocks and the page's own script.

Figures are embedded as JSON (<script type="application/json" class="rlgrad-figure">)
and drawn by one script at the end of the page, which first gives every trace
whose `meta.rows` is true a hover text per point, built from the per-input
block (orchestrator/report_inputs.py) through the point's customdata (its row
number): the prompt, reward mean and std, gradient norm and the first samples
with their rewards. Hover texts are built in the browser, so each prompt and
output is in the page once however many plots show its input.

The per-input table (section #inputs) is drawn by the same script from the same
block: sortable by any column, filtered by trial, reward-std bucket and prompt
text, 100 rows a page, a click on a row shows its samples; a click on a point
of a scatter plot opens that input in the table. Everything is inline: the page
works offline.
"""

from __future__ import annotations

import html

import plotly.io as pio

from .report_inputs import script_json

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.note{color:#555;font-size:13px}nav a{margin-right:1em}
tr.status-ERROR td{background:#fdecea}td.cause{color:#a61b1b;font-family:ui-monospace,monospace;font-size:12px;max-width:40em}
#inputs .controls{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:center;margin:.5em 0;font-size:13px}
#inputs table{width:100%}#inputs th{cursor:pointer;user-select:none;white-space:nowrap}
#inputs th.sorted-asc::after{content:" \\25B2"}#inputs th.sorted-desc::after{content:" \\25BC"}
#inputs tbody tr.row{cursor:pointer}#inputs tbody tr.row:hover{background:#f5f9ff}
#inputs tr.open{background:#eef4ff}#inputs tr.focus{outline:2px solid #1f77b4}
#inputs td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#inputs td.prompt{max-width:50em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
#inputs tr.detail>td{background:#fafafa;padding:.5em 1em}
#inputs .text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;margin:.3em 0 .6em}
#inputs table.samples{width:auto}#inputs table.samples td{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}
"""


def figure_block(anchor: str, fig, note: str, index: int) -> str:
    """A section holding one plotly figure as JSON, drawn by the page's script."""
    fig_json = pio.to_json(fig, validate=False).replace("<", "\\u003c")
    return (f'<section id="{html.escape(anchor)}"><div class="plot" id="plot-{index}"></div>'
            f'<script type="application/json" class="rlgrad-figure" data-plot="plot-{index}">{fig_json}</script>'
            f'<p class="note">{note}</p></section>')


INPUTS_SECTION = """<section id="inputs"><h2>Inputs</h2>
<p class="note">One row per input (and measured step). Click a column to sort, a row to see its samples; a click
on a point in a scatter plot opens its input here. <span id="inputs-limits"></span></p>
<div class="controls">
<label>trial <select id="filter-trial"><option value="">all trials</option></select></label>
<label>reward std <select id="filter-bucket"><option value="">any</option></select></label>
<label>prompt contains <input id="filter-text" type="search" size="24"></label>
<span id="inputs-count"></span>
<button id="page-prev" type="button">&lsaquo; previous</button><button id="page-next" type="button">next &rsaquo;</button>
</div>
<table><thead><tr><th data-key="trial">trial</th><th data-key="step">step</th><th data-key="input">input</th>
<th data-key="prompt">prompt</th><th data-key="mean">reward mean</th><th data-key="std">reward std</th>
<th data-key="grad">grad norm</th><th data-key="k">K</th></tr></thead><tbody></tbody></table>
</section>"""


SCRIPT = r"""
(function () {
  "use strict";
  const block = document.getElementById("rlgrad-inputs");
  const D = block ? JSON.parse(block.textContent) : null;
  const esc = s => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  // plotly's hover labels decode &amp; &lt; &gt; but show &quot; as typed: quotes stay
  const escHover = s => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const flat = s => String(s).replace(/\s+/g, " ").trim();
  const cut = (s, n) => { s = flat(s); return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; };
  const f3 = v => v === null || v === undefined ? "\u2013" : v.toFixed(3);
  const g3 = v => v === null || v === undefined ? "\u2013" : (v === 0 ? "0" : v.toPrecision(3));
  const R = D && D.rows, S = D && D.samples;
  const nrows = R ? R.input.length : 0;
  const multiStep = R ? new Set(R.step).size > 1 : false;

  function samplesOf(r) {
    const out = [];
    for (let j = S.start[r]; j < S.start[r + 1]; j++) out.push({idx: S.idx[j], reward: S.reward[j], output: D.outputs[S.output[j]]});
    return out;
  }

  // the hover label of input row r: plotly renders <br> and <b>, and &lt; entities
  function hoverText(r) {
    const lines = ["<b>input " + R.input[r] + "</b> \u00b7 " + escHover(cut(D.trials[R.trial[r]], 70)) +
                   (multiStep ? " \u00b7 step " + R.step[r] : ""),
                   "prompt: " + escHover(cut(D.prompts[R.prompt[r]], 90)),
                   "reward mean " + f3(R.mean[r]) + " \u00b7 std " + f3(R.std[r]) + " \u00b7 grad norm " + g3(R.grad[r])];
    const shown = samplesOf(r).slice(0, D.limits.hover_samples);
    if (shown.length) lines.push("samples (" + shown.length + " of " + R.k[r] + "), reward: output");
    for (const s of shown) lines.push("\u00a0\u00a0" + f3(s.reward) + ": " + escHover(cut(s.output, 60) || "(empty)"));
    return lines.join("<br>");
  }

  // ---- the per-input table
  const T = {key: "std", dir: 1, page: 0, size: 100, open: new Set(), focus: -1, order: []};
  const el = id => document.getElementById(id);
  const th = D ? D.thresholds : [];
  const edges = [0].concat(th, [Infinity]);
  const bucketOf = v => { let b = 0; while (b < th.length && v >= th[b]) b++; return b; };
  const bucketName = b => "[" + edges[b] + ", " + (edges[b + 1] === Infinity ? "\u221e" : edges[b + 1]) + ")";

  function matching() {
    const t = el("filter-trial").value, b = el("filter-bucket").value, q = el("filter-text").value.toLowerCase();
    const rows = [];
    for (let r = 0; r < nrows; r++) {
      if (t !== "" && R.trial[r] !== +t) continue;
      if (b !== "" && bucketOf(R.std[r]) !== +b) continue;
      if (q && D.prompts[R.prompt[r]].toLowerCase().indexOf(q) < 0) continue;
      rows.push(r);
    }
    const k = T.key, d = T.dir;
    const val = k === "trial" ? (r => D.trials[R.trial[r]]) : k === "prompt" ? (r => D.prompts[R.prompt[r]]) : (r => R[k][r]);
    rows.sort((a, b2) => {
      const x = val(a), y = val(b2);
      if (x === null || x === undefined) return (y === null || y === undefined) ? a - b2 : 1;  // nulls last
      if (y === null || y === undefined) return -1;
      return (x < y ? -d : x > y ? d : a - b2);
    });
    return rows;
  }

  function detail(r) {
    const ss = samplesOf(r);
    let h = '<div class="text">' + esc(D.prompts[R.prompt[r]]) + "</div>";
    h += '<table class="samples"><tr><th>sample</th><th>reward</th><th>output</th></tr>';
    for (const s of ss) h += "<tr><td>" + s.idx + "</td><td>" + f3(s.reward) + "</td><td>" + esc(s.output) + "</td></tr>";
    h += "</table>";
    if (ss.length < R.k[r]) h += '<p class="note">' + ss.length + " of its " + R.k[r] + " samples shown; all are in samples/ (rlgrad query).</p>";
    return '<tr class="detail"><td colspan="8">' + h + "</td></tr>";
  }

  function render() {
    T.order = matching();
    const pages = Math.max(1, Math.ceil(T.order.length / T.size));
    T.page = Math.min(T.page, pages - 1);
    const first = T.page * T.size, rows = T.order.slice(first, first + T.size);
    let h = "";
    for (const r of rows) {
      const open = T.open.has(r);
      h += '<tr class="row' + (open ? " open" : "") + (r === T.focus ? " focus" : "") + '" data-row="' + r + '">' +
           "<td>" + esc(D.trials[R.trial[r]]) + '</td><td class="num">' + R.step[r] + '</td><td class="num">' + R.input[r] +
           '</td><td class="prompt" title="' + esc(cut(D.prompts[R.prompt[r]], 300)) + '">' + esc(cut(D.prompts[R.prompt[r]], 120)) +
           '</td><td class="num">' + f3(R.mean[r]) + '</td><td class="num">' + f3(R.std[r]) + '</td><td class="num">' + g3(R.grad[r]) +
           '</td><td class="num">' + R.k[r] + "</td></tr>" + (open ? detail(r) : "");
    }
    document.querySelector("#inputs tbody").innerHTML = h;
    el("inputs-count").textContent = T.order.length ? (first + 1) + "\u2013" + (first + rows.length) + " of " + T.order.length + " inputs" : "no input matches";
    el("page-prev").disabled = T.page === 0;
    el("page-next").disabled = T.page >= pages - 1;
    document.querySelectorAll("#inputs th").forEach(h2 => {
      h2.className = h2.dataset.key === T.key ? (T.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
    });
  }

  function bucketOptions() {
    const t = el("filter-trial").value, counts = edges.slice(1).map(() => 0);
    for (let r = 0; r < nrows; r++) if (t === "" || R.trial[r] === +t) counts[bucketOf(R.std[r])]++;
    const sel = el("filter-bucket"), keep = sel.value;
    sel.innerHTML = '<option value="">any</option>' + counts.map((c, b) => '<option value="' + b + '">' + bucketName(b) + ": " + c + "</option>").join("");
    sel.value = keep;
  }

  function showRow(r) {  // a click on a plotted point: that input, open, on screen
    el("filter-trial").value = String(R.trial[r]);
    el("filter-bucket").value = "";
    el("filter-text").value = "";
    bucketOptions();
    T.open.add(r);
    T.focus = r;
    T.order = matching();
    T.page = Math.floor(T.order.indexOf(r) / T.size);
    render();
    const tr = document.querySelector('#inputs tr[data-row="' + r + '"]');
    if (tr) tr.scrollIntoView({block: "center"});
  }

  function setUpTable() {
    if (!D || !el("inputs")) return;
    el("filter-trial").innerHTML += D.trials.map((t, i) => '<option value="' + i + '">' + esc(t) + "</option>").join("");
    bucketOptions();
    const L = D.limits;
    el("inputs-limits").textContent = "The page holds each input's first " + L.samples_per_input + " samples, prompts up to " +
      L.prompt_chars + " and outputs up to " + L.output_chars + " characters.";
    const again = () => { T.page = 0; render(); };
    el("filter-trial").addEventListener("change", () => { bucketOptions(); again(); });
    el("filter-bucket").addEventListener("change", again);
    el("filter-text").addEventListener("input", again);
    el("page-prev").addEventListener("click", () => { T.page--; render(); });
    el("page-next").addEventListener("click", () => { T.page++; render(); });
    document.querySelectorAll("#inputs th").forEach(h2 => h2.addEventListener("click", () => {
      T.dir = T.key === h2.dataset.key ? -T.dir : 1;
      T.key = h2.dataset.key;
      render();
    }));
    document.querySelector("#inputs tbody").addEventListener("click", ev => {
      const tr = ev.target.closest("tr.row");
      if (!tr) return;
      const r = +tr.dataset.row;
      if (T.open.has(r)) T.open.delete(r); else T.open.add(r);
      render();
    });
    render();
  }

  // ---- the figures
  function drawFigures() {
    const drawn = [];
    document.querySelectorAll("script.rlgrad-figure").forEach(node => {
      const fig = JSON.parse(node.textContent);
      for (const trace of fig.data) {
        if (D && trace.meta && trace.meta.rows && Array.isArray(trace.customdata)) trace.text = trace.customdata.map(hoverText);
      }
      const div = el(node.dataset.plot);
      drawn.push(Plotly.newPlot(div, fig.data, fig.layout, {responsive: true}).then(gd => {
        gd.on("plotly_click", ev => {
          const p = ev.points && ev.points[0];
          if (D && p && p.data.meta && p.data.meta.rows && typeof p.customdata === "number") showRow(p.customdata);
        });
      }));
    });
    return Promise.all(drawn);
  }

  setUpTable();
  const root = document.documentElement;
  (window.Plotly ? drawFigures() : Promise.resolve()).then(
    () => root.setAttribute("data-rendered-ms", performance.now().toFixed(0)),
    err => root.setAttribute("data-render-error", String(err)));
})();
"""


def page_html(title: str, intro: str, body: str, inputs: dict | None, plotly_js: str | None) -> str:
    """The whole page. `plotly_js`: plotly.js's source, inlined (None: the page has no figure)."""
    scripts = []
    if plotly_js is not None:
        scripts.append("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>")
        scripts.append(f"<script>{plotly_js}</script>")
    if inputs is not None:
        scripts.append(f'<script type="application/json" id="rlgrad-inputs">{script_json(inputs)}</script>')
    scripts.append(f"<script>{SCRIPT}</script>")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{intro}{body}{''.join(scripts)}</body></html>")
