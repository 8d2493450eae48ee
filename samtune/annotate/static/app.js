// samtune annotator: draws an image and its objects, sends each action to the server, draws its answer.
"use strict";
const TOKEN = window.SAMTUNE_TOKEN;
const COLORS = {proposed: [236, 197, 85], accepted: [102, 221, 102], fixed: [102, 170, 255],
                added: [85, 221, 221], rejected: [230, 102, 102]};
const S = {queue: null, index: 0, state: null, image: null, selected: null, boxMode: false, scale: 1,
           ox: 0, oy: 0, shownAt: performance.now(), selectedAt: performance.now(), drag: null, space: false,
           busy: false, overlays: {}};
window.samtune = S;  // tests and the latency benchmark read it
S.select = id => select(id);
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");

async function api(path, body) {
  const opts = {headers: {"X-Token": TOKEN}};
  if (body !== undefined) {
    opts.method = "POST"; opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, opts);
  if (!res.ok) {
    let msg = res.status + "";
    try { msg = (await res.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

function status(text) { document.getElementById("status").textContent = text || ""; }

function decodeRuns(runs, w, h, rgb, alpha) {
  // the mask filled at `alpha`, its outline (pixels with a 4-neighbour outside it) opaque
  const on = new Uint8Array(w * h);
  let pos = 0, inside = false;
  for (const n of runs) { if (inside) on.fill(1, pos, pos + n); pos += n; inside = !inside; }
  const img = new ImageData(w, h);
  for (let p = 0; p < w * h; p++) {
    if (!on[p]) continue;
    const x = p % w, y = (p - x) / w;
    const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !on[p - 1] || !on[p + 1] || !on[p - w] || !on[p + w];
    const o = 4 * p;
    img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = edge ? 255 : alpha;
  }
  return img;
}

function overlay(obj) {
  const [h, w] = S.state.size;
  const sel = obj.id === S.selected;
  const key = obj.id + ":" + obj.status + ":" + sel + ":" + obj.runs.length + ":" + obj.runs.slice(0, 6).join(",");
  if (S.overlays[obj.id] && S.overlays[obj.id].key === key) return S.overlays[obj.id].canvas;
  const c = document.createElement("canvas"); c.width = w; c.height = h;
  const alpha = obj.status === "rejected" ? 50 : (sel ? 150 : 95);
  c.getContext("2d").putImageData(decodeRuns(obj.runs, w, h, COLORS[obj.status] || [255, 255, 255], alpha), 0, 0);
  S.overlays[obj.id] = {key: key, canvas: c};
  return c;
}

function draw() {
  const stage = document.getElementById("stage");
  canvas.width = stage.clientWidth; canvas.height = stage.clientHeight;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!S.image || !S.state) return;
  ctx.setTransform(S.scale, 0, 0, S.scale, S.ox, S.oy);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(S.image, 0, 0);
  for (const obj of S.state.objects) ctx.drawImage(overlay(obj), 0, 0);
  const sel = S.state.objects.find(o => o.id === S.selected);
  if (sel && sel.clicks) {
    sel.clicks.points.forEach((p, k) => {
      ctx.fillStyle = sel.clicks.labels[k] ? "#0f0" : "#f00";
      ctx.beginPath(); ctx.arc(p[0] + 0.5, p[1] + 0.5, 3 / S.scale, 0, 7); ctx.fill();
    });
  }
  if (S.drag && S.drag.box) {
    const b = S.drag;
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1 / S.scale;
    ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
  }
  S.drawnAt = performance.now();
}

function fit() {
  const stage = document.getElementById("stage");
  const [h, w] = S.state ? S.state.size : [1, 1];
  S.scale = Math.min(stage.clientWidth / w, stage.clientHeight / h) || 1;
  S.ox = (stage.clientWidth - w * S.scale) / 2; S.oy = (stage.clientHeight - h * S.scale) / 2;
}

function renderSide() {
  const q = S.queue;
  const reviewed = q.images.filter(i => i.reviewed).length;
  document.getElementById("progress").textContent = reviewed + " / " + q.total + " reviewed";
  document.getElementById("name").textContent = q.images[S.index] ? q.images[S.index].name : "";
  document.getElementById("mode").textContent = S.boxMode ? "box" : "click";
  const list = document.getElementById("objects"); list.innerHTML = "";
  if (!S.state) return;
  for (const obj of S.state.objects) {
    const li = document.createElement("li");
    li.className = obj.status + (obj.id === S.selected ? " sel" : "");
    li.dataset.id = obj.id;
    li.textContent = "#" + obj.id + " " + obj.status + (obj.n_clicks ? " (" + obj.n_clicks + " clicks)" : "")
      + (obj.predicted_iou != null ? " IoU~" + obj.predicted_iou.toFixed(2) : "");
    li.onclick = () => select(obj.id);
    list.appendChild(li);
  }
  const sel = S.state.objects.find(o => o.id === S.selected);
  document.getElementById("selected").textContent = sel
    ? "selected #" + sel.id + " (" + sel.status + ")" + (sel.predicted_iou != null ? ", predicted IoU " + sel.predicted_iou.toFixed(3) : "")
    : "nothing selected";
}

function select(id) {
  S.selected = id; S.selectedAt = performance.now(); renderSide(); draw();
  // the server decodes the object's first click ahead of the user's (an answer is not needed)
  if (id != null && S.state) api("/api/action/" + S.index, {action: "select", object: id}).catch(() => {});
}

async function loadQueue() { S.queue = await (await api("/api/queue")).json(); }

async function open(index) {
  S.index = index; S.selected = null; S.state = null; S.image = null; S.overlays = {}; status("");
  renderSide(); draw();
  const t0 = performance.now();
  try {
    const [imgRes, stateRes] = await Promise.all([api("/api/image/" + index), api("/api/state/" + index)]);
    const blob = await imgRes.blob();
    S.image = await createImageBitmap(blob);
    S.state = await stateRes.json();
  } catch (e) {
    status("Image " + (S.queue.images[index] || {}).name + " could not be opened: " + e.message + "\nN or P moves on.");
    renderSide(); return;
  }
  S.shownAt = performance.now(); S.openMs = S.shownAt - t0;
  fit(); renderSide(); draw();
}

async function act(body) {
  if (S.busy || !S.state) return null;
  S.busy = true;
  const t0 = performance.now();
  body.seconds = (performance.now() - (S.selected != null ? S.selectedAt : S.shownAt)) / 1000;
  try {
    S.state = await (await api("/api/action/" + S.index, body)).json();
    status("");
  } catch (e) { status(e.message); S.busy = false; return null; }
  S.busy = false;
  renderSide(); draw();
  S.lastAction = {action: body.action, ms: performance.now() - t0};
  return S.state;
}

function imagePoint(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left - S.ox) / S.scale, (ev.clientY - r.top - S.oy) / S.scale];
}

function objectAt(x, y) {
  if (!S.state) return null;
  const [h, w] = S.state.size;
  const p = Math.floor(y) * w + Math.floor(x);
  let best = null, bestArea = Infinity;
  for (const obj of S.state.objects) {
    let pos = 0, on = false, inside = false, area = 0;
    for (const n of obj.runs) { if (on) { area += n; if (p >= pos && p < pos + n) inside = true; } pos += n; on = !on; }
    if (inside && area < bestArea) { best = obj; bestArea = area; }
  }
  return best;
}

async function click(ev, label) {
  const [x, y] = imagePoint(ev);
  const [h, w] = S.state.size;
  if (x < 0 || y < 0 || x >= w || y >= h) return;
  if (S.selected == null) {
    const hit = objectAt(x, y);
    if (hit) { select(hit.id); return; }
    if (label === 0) return;
    const before = new Set(S.state.objects.map(o => o.id));
    const st = await act({action: "click", object: null, x: x, y: y, label: 1});
    if (st) { const added = st.objects.find(o => !before.has(o.id)); if (added) select(added.id); }
    return;
  }
  await act({action: "click", object: S.selected, x: x, y: y, label: label});
}

canvas.addEventListener("contextmenu", ev => ev.preventDefault());
canvas.addEventListener("mousedown", ev => {
  const [x, y] = imagePoint(ev);
  if (ev.button === 1 || (ev.button === 0 && S.space)) {
    S.drag = {pan: true, sx: ev.clientX, sy: ev.clientY, ox: S.ox, oy: S.oy}; return;
  }
  if (S.boxMode && ev.button === 0) { S.drag = {box: true, x0: x, y0: y, x1: x, y1: y}; return; }
  if (ev.button === 2) { if (S.selected != null) click(ev, 0); return; }
  if (ev.button === 0) click(ev, ev.shiftKey ? 0 : 1);
});
canvas.addEventListener("mousemove", ev => {
  if (!S.drag) return;
  if (S.drag.pan) { S.ox = S.drag.ox + ev.clientX - S.drag.sx; S.oy = S.drag.oy + ev.clientY - S.drag.sy; draw(); return; }
  const [x, y] = imagePoint(ev); S.drag.x1 = x; S.drag.y1 = y; draw();
});
canvas.addEventListener("mouseup", async ev => {
  const d = S.drag; S.drag = null;
  if (!d || !d.box) { draw(); return; }
  const [h, w] = S.state.size;
  const clamp = (v, hi) => Math.max(0, Math.min(hi - 1, v));
  const box = [clamp(d.x0, w), clamp(d.y0, h), clamp(d.x1, w), clamp(d.y1, h)];
  if (Math.abs(box[2] - box[0]) < 2 || Math.abs(box[3] - box[1]) < 2) { draw(); return; }
  const before = new Set(S.state.objects.map(o => o.id));
  const st = await act({action: "box", box: box});
  S.boxMode = false;
  if (st) { const added = st.objects.find(o => !before.has(o.id)); if (added) select(added.id); }
  renderSide(); draw();
});
canvas.addEventListener("wheel", ev => {
  ev.preventDefault();
  zoomAt(ev.deltaY < 0 ? 1.25 : 0.8, ev.clientX - canvas.getBoundingClientRect().left,
         ev.clientY - canvas.getBoundingClientRect().top);
}, {passive: false});

function zoomAt(f, cx, cy) { S.ox = cx - (cx - S.ox) * f; S.oy = cy - (cy - S.oy) * f; S.scale *= f; draw(); }

async function decide(action) { if (S.selected != null) await act({action: action, object: S.selected}); }
async function removeSelected() {
  if (S.selected == null) return;
  const id = S.selected; S.selected = null;
  if (!(await act({action: "delete", object: id}))) S.selected = id;
}
async function done() {
  if (!S.state || S.state.failed) { await next(); return; }
  await act({action: "done"}); await loadQueue(); await next();
}
async function next() {
  await loadQueue();
  const after = S.queue.images.find(i => i.index > S.index && !i.reviewed);
  await open(after ? after.index : Math.min(S.index + 1, S.queue.total - 1));
}
async function prev() { await loadQueue(); await open(Math.max(0, S.index - 1)); }
async function undo() { await act({action: "undo"}); if (S.state && !S.state.objects.find(o => o.id === S.selected)) S.selected = null; renderSide(); draw(); }

document.getElementById("accept").onclick = () => decide("accept");
document.getElementById("reject").onclick = () => decide("reject");
document.getElementById("delete").onclick = removeSelected;
document.getElementById("box").onclick = () => { S.boxMode = !S.boxMode; renderSide(); };
document.getElementById("undo").onclick = undo;
document.getElementById("prev").onclick = prev;
document.getElementById("done").onclick = done;

document.addEventListener("keydown", ev => {
  if (ev.key === " ") { S.space = true; ev.preventDefault(); return; }
  const k = ev.key.toLowerCase();
  if (k === "a") decide("accept");
  else if (k === "r") decide("reject");
  else if (k === "delete" || k === "backspace") removeSelected();
  else if (k === "z") undo();
  else if (k === "b") { S.boxMode = !S.boxMode; renderSide(); }
  else if (k === "n" || k === "enter") done();
  else if (k === "p") prev();
  else if (k === "arrowright") next();
  else if (k === "escape") select(null);
  else if (k === "tab") {
    ev.preventDefault();
    const ids = S.state ? S.state.objects.map(o => o.id) : [];
    if (ids.length) select(ids[(ids.indexOf(S.selected) + 1) % ids.length]);
  }
  else if (k === "+" || k === "=") zoomAt(1.25, canvas.width / 2, canvas.height / 2);
  else if (k === "-") zoomAt(0.8, canvas.width / 2, canvas.height / 2);
  else if (k === "0") { fit(); draw(); }
});
document.addEventListener("keyup", ev => { if (ev.key === " ") S.space = false; });
window.addEventListener("resize", draw);

(async () => {
  try { await loadQueue(); await open(S.queue.current); S.ready = true; }
  catch (e) { status("The annotator could not start: " + e.message); }
})();
