// GeoToken page: upload a photo, POST it to /v1/geolocate, draw the candidates on an SVG world map.
// Map coordinates are equirectangular degrees: x = lon + 180 (0..360), y = 90 - lat (0..180);
// zooming and panning only change the SVG viewBox.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const map = $("map");
let view = { x: 0, y: 0, w: 360, h: 180 };
let candidates = [];

const toXY = (lat, lon) => [lon + 180, 90 - lat];

function setView(v) {
  const w = Math.min(360, Math.max(0.002, v.w));
  const h = w / 2;
  const x = Math.min(360 - w, Math.max(0, v.x));
  const y = Math.min(180 - h, Math.max(0, v.y));
  view = { x, y, w, h };
  map.setAttribute("viewBox", `${x} ${y} ${w} ${h}`);
  const r = (7 * w) / map.clientWidth || 7; // markers keep ~7 screen pixels at any zoom
  for (const c of map.querySelectorAll("#markers circle")) c.setAttribute("r", c.classList.contains("best") ? r * 1.3 : r);
  for (const t of map.querySelectorAll("#markers text")) t.setAttribute("font-size", r * 1.3);
}

function zoomAt(factor, cx, cy) {
  // keep the map point (cx, cy) under the same screen position
  const w = Math.min(360, Math.max(0.002, view.w / factor));
  const s = w / view.w;
  setView({ x: cx - (cx - view.x) * s, y: cy - (cy - view.y) * s, w });
}

function clientToMap(ev) {
  const rect = map.getBoundingClientRect();
  // the viewBox (2:1) is centred in the element (meet): compute the drawn area
  const scale = Math.min(rect.width / view.w, rect.height / view.h);
  const ox = rect.left + (rect.width - view.w * scale) / 2;
  const oy = rect.top + (rect.height - view.h * scale) / 2;
  return [view.x + (ev.clientX - ox) / scale, view.y + (ev.clientY - oy) / scale, scale];
}

function drawGraticule() {
  const g = $("graticule");
  for (let lon = -150; lon <= 150; lon += 30) {
    const l = document.createElementNS(SVG, "line");
    l.setAttribute("x1", lon + 180); l.setAttribute("x2", lon + 180); l.setAttribute("y1", 0); l.setAttribute("y2", 180);
    g.appendChild(l);
  }
  for (let lat = -60; lat <= 60; lat += 30) {
    const l = document.createElementNS(SVG, "line");
    l.setAttribute("y1", 90 - lat); l.setAttribute("y2", 90 - lat); l.setAttribute("x1", 0); l.setAttribute("x2", 360);
    g.appendChild(l);
  }
}

function fitCandidates() {
  if (!candidates.length) return setView({ x: 0, y: 0, w: 360 });
  const xs = candidates.map((c) => c.lon + 180), ys = candidates.map((c) => 90 - c.lat);
  const pad = 4;
  const x0 = Math.min(...xs) - pad, x1 = Math.max(...xs) + pad, y0 = Math.min(...ys) - pad, y1 = Math.max(...ys) + pad;
  const w = Math.max(x1 - x0, 2 * (y1 - y0), 20);
  setView({ x: (x0 + x1) / 2 - w / 2, y: (y0 + y1) / 2 - w / 4, w });
}

function drawCandidates() {
  const cells = $("cells"), markers = $("markers");
  cells.replaceChildren(); markers.replaceChildren();
  candidates.forEach((c, i) => {
    if (Array.isArray(c.polygon) && c.polygon.length >= 3) {
      const lon0 = c.polygon[0][1];
      const pts = c.polygon.map(([lat, lon]) => {
        if (lon - lon0 > 180) lon -= 360; else if (lon0 - lon > 180) lon += 360; // a cell across the antimeridian
        return toXY(lat, lon).join(",");
      });
      const p = document.createElementNS(SVG, "polygon");
      p.setAttribute("points", pts.join(" "));
      p.dataset.cell = c.cell;
      cells.appendChild(p);
    }
    const [x, y] = toXY(c.lat, c.lon);
    const m = document.createElementNS(SVG, "circle");
    m.setAttribute("cx", x); m.setAttribute("cy", y);
    m.setAttribute("class", i === 0 ? "marker best" : "marker");
    m.dataset.rank = i + 1; m.dataset.lat = c.lat; m.dataset.lon = c.lon;
    const title = document.createElementNS(SVG, "title");
    title.textContent = `#${i + 1} ${placeText(c.place)} (${fmtPct(c.probability)})`;
    m.appendChild(title);
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = i + 1;
    markers.prepend(t); markers.prepend(m); // rank 1 drawn last (on top)
  });
  fitCandidates();
}

function placeText(p) {
  if (!p) return "";
  return [p.city, p.region, p.country].filter(Boolean).join(", ");
}
const fmtPct = (p) => (p === null || p === undefined ? "n/a" : `${(100 * p).toFixed(1)}%`);

function listCandidates(result) {
  const ol = $("candidates");
  ol.replaceChildren();
  result.candidates.forEach((c, i) => {
    const li = document.createElement("li");
    li.className = "candidate";
    const levels = (c.level_confidence || [])
      .map((v, l) => `<span title="level ${l}: ${fmtPct(v)}"><i style="height:${Math.max(4, 100 * v)}%"></i></span>`).join("");
    li.innerHTML =
      `<span class="prob" title="P(within ${c.probability_within_km} km)">${fmtPct(c.probability)}</span>` +
      `<span class="where"></span><br><span class="muted">${c.lat.toFixed(4)}, ${c.lon.toFixed(4)} · cell ${c.cell}</span>` +
      `<div class="levels" title="per-level confidence, coarse to fine">${levels}</div>`;
    li.querySelector(".where").textContent = placeText(c.place) || "(no place name)";
    const zoomTo = () => { // zoom onto the candidate's cell, outline visible
      const [x, y] = toXY(c.lat, c.lon);
      const lons = (c.polygon || []).map((v) => v[1]);
      const extent = lons.length ? Math.max(...lons) - Math.min(...lons) : 0;
      const w = Math.min(360, Math.max(0.002, 12 * extent));
      setView({ x: x - w / 2, y: y - w / 4, w });
    };
    li.tabIndex = 0; // by keyboard too: Tab to it, Enter or Space
    li.setAttribute("role", "button");
    li.addEventListener("click", zoomTo);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); zoomTo(); } });
    ol.appendChild(li);
  });
  const t = result.timings_ms || {};
  const n = result.candidates.length;
  $("status").textContent = `${n} candidate${n === 1 ? "" : "s"} · ${result.strategy} + ${result.select} · ` +
    `${Math.round(t.request || t.total || 0)} ms` + (result.note ? ` · ${result.note}` : "");
}

let current = null; // the photo on screen, and the number of its latest request: older answers are dropped
let requests = 0;

function clearCandidates() {
  candidates = [];
  $("candidates").replaceChildren();
  drawCandidates();
}

async function upload(file) {
  if (!file) return;
  current = file;
  const id = ++requests;
  const status = $("status");
  status.className = ""; status.textContent = "locating…";
  clearCandidates(); // the last photo's answer is not this one's
  const photo = $("photo");
  photo.src = URL.createObjectURL(file); photo.hidden = false; $("drop-text").hidden = true;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", $("top_k").value || "5");
  if ($("strategy").value) form.append("strategy", $("strategy").value);
  if ($("select").value) form.append("select", $("select").value);
  if (!$("constrain").disabled) form.append("constrain", $("constrain").checked ? "true" : "false");
  try {
    const resp = await fetch("/v1/geolocate", { method: "POST", body: form });
    let body;
    try { body = await resp.json(); } catch { throw new Error(`HTTP ${resp.status} ${resp.statusText}`); } // a proxy's page
    if (id !== requests) return; // another photo (or option) was asked for since: its answer decides
    if (!resp.ok) throw new Error(body.error || body.detail || resp.statusText);
    candidates = body.candidates;
    listCandidates(body);
    drawCandidates();
    map.dataset.state = "done";
  } catch (err) {
    if (id !== requests) return;
    status.className = "error"; status.textContent = `error: ${err.message}`;
    map.dataset.state = "error";
  }
}

function setupInput() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    upload(e.target.files[0]);
    e.target.value = ""; // the same file picked again (a retry) is a change too
  });
  for (const id of ["top_k", "strategy", "select", "constrain"]) { // an option changed: the photo again
    $(id).addEventListener("change", () => { if (current) upload(current); });
  }
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
}

function setupMap() {
  map.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [cx, cy] = clientToMap(e);
    zoomAt(Math.exp(-e.deltaY * 0.0015), cx, cy);
  }, { passive: false });
  let drag = null;
  map.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY, v: { ...view } }; map.classList.add("dragging"); map.setPointerCapture(e.pointerId); });
  map.addEventListener("pointermove", (e) => {
    const [mx, my, scale] = clientToMap(e);
    $("cursor").textContent = `${(90 - my).toFixed(3)}, ${(mx - 180).toFixed(3)}`;
    if (drag) setView({ x: drag.v.x - (e.clientX - drag.x) / scale, y: drag.v.y - (e.clientY - drag.y) / scale, w: drag.v.w });
  });
  const end = () => { drag = null; map.classList.remove("dragging"); };
  map.addEventListener("pointerup", end); map.addEventListener("pointercancel", end);
  const centre = () => [view.x + view.w / 2, view.y + view.h / 2];
  $("zoom-in").onclick = () => zoomAt(2, ...centre());
  $("zoom-out").onclick = () => zoomAt(0.5, ...centre());
  $("zoom-fit").onclick = fitCandidates;
  $("zoom-world").onclick = () => setView({ x: 0, y: 0, w: 360 });
  window.addEventListener("resize", () => setView(view));
}

function offer(id, values) { // the options the loaded model has (GeoCLIP: its own one), if not the page's
  const sel = $(id);
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (!Array.isArray(values) || [...values].sort().join() === [...have].sort().join()) return;
  const options = values.map((v) => Object.assign(document.createElement("option"), { value: v, textContent: v }));
  sel.replaceChildren(sel.options[0], ...options);
}

async function showModel() {
  try {
    const r = await (await fetch("/v1/model")).json();
    const m = r.model;
    offer("strategy", r.strategies); offer("select", r.selectors);
    const most = r.limits && r.limits.max_top_k; // the server's --max-top-k: the box never asks for more
    if (Number.isInteger(most)) { $("top_k").max = most; $("top_k").value = Math.min(Number($("top_k").value) || 5, most); }
    const search = m.search || {}; // the bundle's default decoding; a model without one (GeoCLIP): no box
    if (typeof search.constrain === "boolean") $("constrain").checked = search.constrain;
    else { $("constrain").checked = false; $("constrain").disabled = true; }
    const b = m.backbone ? m.backbone.name : "?";
    $("model").textContent = `${b} · ${m.parameters ? (m.parameters / 1e6).toFixed(1) + "M params" : ""} · gallery ${m.gallery_rows ?? "?"}`;
  } catch (e) { /* the page still works without it */ }
}

drawGraticule(); setupInput(); setupMap(); setView(view); showModel();
