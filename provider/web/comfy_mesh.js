// comfy-mesh in ComfyUI's web page (the provider's WEB_DIRECTORY; ComfyUI serves it at /extensions/comfy_mesh/).
//
// - Each node the mesh served in the last run gets a badge over its title: the member that computed it, the bytes
//   that came over, the lookup time and the compute time it saved (from the `comfy-mesh.served` event the provider
//   sends for each such node). ComfyUI's own cache marks nothing like it, so a mesh hit is told apart from a
//   node cached locally.
// - A "Mesh" sidebar tab: members and their states, this node's budget and use, hit ratio, compute saved, and
//   warnings (GET /comfy-mesh/status, polled while the tab is open).
// - Settings in ComfyUI's settings dialog (comfy-mesh category): the provider on or off, class types never cached
//   (POST /comfy-mesh/settings; the running provider's policy changes at once).
//
// Every API of the frontend is feature-detected: an older or newer frontend without one loses that part only.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "comfy-mesh.served";
const POLL_MS = 3000;
const BADGE_BG = "#5b2a86";   // violet: no ComfyUI state uses it

// What the page knows, also for tests and the browser console: window.comfyMesh.
const state = { served: new Map(), status: null, error: null, settingsError: null };
window.comfyMesh = state;

function fmtBytes(n) {
  if (n == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

function fmtMs(ms) {
  if (ms == null) return "?";
  if (ms >= 60000) return `${(ms / 60000).toFixed(1)} min`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Number(ms).toFixed(ms < 10 ? 1 : 0)} ms`;
}

function badgeText(s) {
  const saved = s.saved_ms == null ? "" : ` · saved ${fmtMs(s.saved_ms)}`;
  return `mesh ⇐ ${s.member || "?"} · ${fmtBytes(s.bytes)} in ${fmtMs(s.ms)}${saved}`;
}

function findNode(id) {
  const graph = app.graph;
  if (!graph || typeof graph.getNodeById !== "function") return null;
  return graph.getNodeById(id) ?? (/^\d+$/.test(String(id)) ? graph.getNodeById(Number(id)) : null);
}

function redraw() {
  try { app.graph?.setDirtyCanvas?.(true, true); app.canvas?.setDirty?.(true, true); } catch (e) { /* cosmetic */ }
}

// Canvas nodes draw `node.badges` over their title; where there is no LGraphBadge, draw the text ourselves.
function drawFallback(node) {
  if (node.__comfyMeshDraw) return;
  node.__comfyMeshDraw = true;
  const previous = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    const r = previous?.apply(this, [ctx, ...rest]);
    const s = this.comfyMesh;
    if (s && ctx) {
      const text = badgeText(s);
      ctx.save();
      ctx.font = "12px sans-serif";
      const w = ctx.measureText(text).width + 12;
      const y = -(window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30) - 24;
      ctx.fillStyle = BADGE_BG;
      ctx.fillRect(0, y, w, 20);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, 6, y + 14);
      ctx.restore();
    }
    return r;
  };
}

// Nodes 2.0 (Vue nodes, DOM elements with data-node-id) may not draw canvas badges: the same text in the DOM.
function domNode(id) {
  try { return document.querySelector(`[data-node-id="${CSS.escape(String(id))}"]`); } catch (e) { return null; }
}

function markDom(served) {
  const element = domNode(served.node_id);
  if (!element) return;
  element.querySelector(":scope > .comfy-mesh-badge")?.remove();
  const badge = document.createElement("div");
  badge.className = "comfy-mesh-badge";
  badge.textContent = badgeText(served);
  badge.style.cssText = `position:absolute;left:0;bottom:100%;margin-bottom:4px;padding:1px 5px;border-radius:4px;`
    + `background:${BADGE_BG};color:#fff;font-size:10px;white-space:nowrap;pointer-events:none;z-index:10`;
  element.append(badge);
}

function unmarkDom(id) {
  domNode(id)?.querySelector(":scope > .comfy-mesh-badge")?.remove();
}

function unmark(node) {
  if (!node) return;
  delete node.comfyMesh;
  if (Array.isArray(node.badges)) node.badges = node.badges.filter((b) => !b?.comfyMesh);
}

function mark(served) {
  state.served.set(String(served.node_id), served);
  markDom(served);
  const node = findNode(served.node_id);
  if (!node) return;
  unmark(node);
  node.comfyMesh = served;
  if (Array.isArray(node.badges) && typeof window.LGraphBadge === "function") {
    const badge = new window.LGraphBadge({ text: badgeText(served), fgColor: "#ffffff", bgColor: BADGE_BG,
                                           fontSize: 10, height: 17, padding: 4 });
    badge.comfyMesh = true;
    node.badges.push(badge);
  } else {
    drawFallback(node);
  }
  redraw();
  renderPanel();
}

function clearMarks() {
  for (const id of state.served.keys()) { unmark(findNode(id)); unmarkDom(id); }
  state.served.clear();
  redraw();
}

// -- the panel --------------------------------------------------------------------------------------------------

let panel = null;
let timer = null;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return e;
}

const STATE_COLORS = { ALIVE: "#3a9d5d", SUSPECT: "#c9a227", DEAD: "#c0392b", LEFT: "#888" };

function renderPanel() {
  if (!panel || !panel.isConnected) return;
  const s = state.status;
  const cell = "padding:2px 6px;border-bottom:1px solid var(--border-color,#444);text-align:left";
  const box = el("div", { id: "comfy-mesh-panel", style: "padding:10px;font-size:13px;line-height:1.5;overflow:auto" });
  box.append(el("h3", { style: "margin:0 0 6px 0" }, "comfy-mesh"));
  if (state.error) box.append(el("div", { style: "color:#e67e22" }, `status: ${state.error}`));
  if (!s) {
    box.append(el("div", {}, "loading…"));
  } else if (!s.running) {
    box.append(el("div", { "data-warning": "1", style: "color:#e67e22" }, s.reason || "comfy-mesh is not running"));
  } else {
    const p = s.provider || {};
    const b = s.budget;
    box.append(el("div", {}, `node ${s.node_id ?? "?"} (${s.mode}), cluster ${s.cluster ?? "?"}, ${s.replicas ?? "?"} replicas`));
    box.append(el("div", { "data-field": "budget" }, b
      ? `memory: ${fmtBytes(b.bytes_used)} of ${fmtBytes(b.max_memory)} owned, ${fmtBytes(b.near_bytes_used)} of ${fmtBytes(b.near_max_memory)} near cache, ${b.entries} entries`
      : "memory: unknown (the mesh does not answer)"));
    const ratio = p.hit_ratio == null ? "–" : `${(p.hit_ratio * 100).toFixed(1)} %`;
    box.append(el("div", { "data-field": "hits" },
      `hit ratio ${ratio} (${p.hits ?? 0} served, ${p.misses ?? 0} computed here), ${fmtBytes(p.bytes_served)} from the mesh`));
    box.append(el("div", { "data-field": "saved" }, `compute saved: ${fmtMs((p.saved_seconds ?? 0) * 1000)}`));
    box.append(el("div", {}, `provider: ${s.settings?.enabled === false ? "off" : "on"}`
      + (s.settings?.never?.length ? `, never cached: ${s.settings.never.join(", ")}` : "")));
    const table = el("table", { id: "comfy-mesh-members", style: "border-collapse:collapse;margin:6px 0;width:100%" });
    table.append(el("tr", {}, ...["member", "state", "keys", "bytes"].map((h) => el("th", { style: cell }, h))));
    for (const m of s.members || []) {
      const color = STATE_COLORS[m.state] || "inherit";
      table.append(el("tr", { "data-member": m.node_id, "data-state": m.state, title: m.address },
        el("td", { style: cell }, m.node_id + (m.self ? " (this)" : "")),
        el("td", { style: `${cell};color:${color};font-weight:bold` }, m.state), el("td", { style: cell }, m.keys),
        el("td", { style: cell }, fmtBytes(m.bytes))));
    }
    box.append(table);
  }
  const warnings = s?.warnings || [];
  if (warnings.length) {
    const list = el("ul", { id: "comfy-mesh-warnings", style: "margin:4px 0;padding-left:18px;color:#e67e22" });
    for (const w of warnings) list.append(el("li", { "data-warning": "1" }, w));
    box.append(el("div", { style: "font-weight:bold" }, "warnings"), list);
  }
  if (state.served.size) {
    const list = el("ul", { id: "comfy-mesh-served", style: "margin:4px 0;padding-left:18px" });
    for (const v of state.served.values()) list.append(el("li", { "data-served": v.node_id }, `#${v.node_id} ${v.class_type}: ${badgeText(v)}`));
    box.append(el("div", { style: "font-weight:bold" }, "served in the last run"), list);
  }
  panel.replaceChildren(box);
}

async function refresh() {
  try {
    const r = await api.fetchApi("/comfy-mesh/status");
    state.status = await r.json();
    state.error = r.ok ? null : `HTTP ${r.status}`;
  } catch (e) {
    state.error = String(e);
  }
  renderPanel();
}

function startPolling(element) {
  panel = element;
  renderPanel();
  refresh();
  if (timer == null) {
    timer = setInterval(() => {
      if (!panel || !panel.isConnected) { clearInterval(timer); timer = null; return; }
      refresh();
    }, POLL_MS);
  }
}

// -- settings ---------------------------------------------------------------------------------------------------

async function pushSettings(body) {
  try {
    const r = await api.fetchApi("/comfy-mesh/settings", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    state.settingsError = r.ok ? null : `HTTP ${r.status}`;
  } catch (e) {
    state.settingsError = String(e);
  }
  if (panel) refresh();
}

app.registerExtension({
  name: "comfy-mesh.web",
  settings: [
    {
      id: "ComfyMesh.Enabled",
      category: ["comfy-mesh", "Provider", "Enabled"],
      name: "Use the mesh cache (look node outputs up in the mesh and store them there)",
      type: "boolean",
      defaultValue: true,
      onChange: (value) => pushSettings({ enabled: value !== false }),
    },
    {
      id: "ComfyMesh.NeverCached",
      category: ["comfy-mesh", "Provider", "NeverCached"],
      name: "Class types never cached (comma-separated, on top of MESH_DENY)",
      type: "text",
      defaultValue: "",
      onChange: (value) => pushSettings({ never: typeof value === "string" ? value : "" }),
    },
  ],
  async setup() {
    if (typeof api?.addEventListener === "function") {
      api.addEventListener(EVENT, (e) => { try { mark(e.detail); } catch (err) { console.warn("comfy-mesh", err); } });
      api.addEventListener("execution_start", () => clearMarks());
    }
    const manager = app.extensionManager;
    if (manager && typeof manager.registerSidebarTab === "function") {
      manager.registerSidebarTab({
        id: "comfy-mesh",
        icon: "pi pi-sitemap",
        title: "Mesh",
        tooltip: "comfy-mesh: members, memory, hits, warnings",
        type: "custom",
        render: (element) => startPolling(element),
        destroy: () => { panel = null; },
      });
    } else {
      console.info("comfy-mesh: this frontend has no sidebar tabs; see /comfy-mesh/status");
    }
  },
});
