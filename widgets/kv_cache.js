// KVCacheInspector front end: totals, per-layer and per-frame tables, eviction timeline, bytes over time.
// With `live` on, a timer asks the kernel for a refresh every `poll_ms` milliseconds.

function table(columns, rows, testid) {
  const head = h("tr", {}, columns.map(([label]) => h("th", { text: label })));
  const body = rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", { text: cell(row) }))));
  return h("table", { class: "mv-table", "data-testid": testid, "data-rows": String(rows.length) }, [head, ...body]);
}

function bytesChart(history, width = 320, height = 60) {
  const svg = svgBox(width, height, "bytes-chart");
  const max = Math.max(1, ...history.map((r) => r.text_bytes + r.vision_bytes));
  for (const [key, color] of [["text_bytes", "#2e86c1"], ["vision_bytes", "#d35400"]]) {
    svg.appendChild(polyline(history.map((r) => r[key] / max), width, height, color));
  }
  return svg;
}

function render({ model, el }) {
  const refresh = h("button", { "data-testid": "refresh", text: "Refresh" });
  refresh.addEventListener("click", () => model.send({ type: "refresh" }));
  const live = h("input", { type: "checkbox", "data-testid": "live" });
  live.addEventListener("change", () => { model.set("live", live.checked); model.save_changes(); });
  const totals = h("div", { class: "mv-kv", "data-testid": "totals" });
  const layers = h("div");
  const segments = h("div", { class: "mv-scroll" });
  const events = h("div", { class: "mv-scroll" });
  const chart = h("div");
  el.appendChild(h("div", { class: "mv-widget mv-kvcache" }, [
    h("div", { class: "mv-controls" }, [refresh, h("label", {}, [live, document.createTextNode(" live")])]),
    totals, chart,
    h("div", { class: "mv-row" }, [layers, segments]),
    h("div", { class: "mv-muted", text: "evictions and pooling" }), events,
  ]));

  let timer = null;
  const schedule = () => {
    if (timer) clearInterval(timer);
    timer = null;
    live.checked = model.get("live");
    if (model.get("live")) timer = setInterval(() => model.send({ type: "refresh" }), Math.max(50, model.get("poll_ms")));
  };
  const update = () => {
    const t = model.get("totals") || {};
    totals.replaceChildren();
    for (const [label, key, fmt] of [["step", null], ["text tokens", "text_tokens"], ["text bytes", "text_bytes", formatBytes],
      ["frames", "vision_frames"], ["vision tokens", "vision_tokens"], ["vision bytes", "vision_bytes", formatBytes],
      ["total bytes", "bytes", formatBytes], ["allocated", "allocated_bytes", formatBytes], ["frames evicted", "frames_evicted"]]) {
      const value = key === null ? model.get("step") : t[key];
      if (value === undefined) continue;
      totals.appendChild(h("span", { class: "mv-muted", text: label }));
      totals.appendChild(h("span", { "data-testid": `total-${key || "step"}`, text: fmt ? fmt(value) : String(value) }));
    }
    layers.replaceChildren(table([["layer", (r) => r.layer], ["kind", (r) => r.kind], ["tokens", (r) => r.tokens],
      ["bytes", (r) => formatBytes(r.bytes)]], model.get("layers"), "layers"));
    segments.replaceChildren(table([["frame", (r) => r.frame_index],
      ["t (s)", (r) => (r.timestamp === null ? "—" : r.timestamp.toFixed(1))], ["position", (r) => r.position],
      ["vis span", (r) => `${r.start}–${r.end}`], ["tokens", (r) => r.tokens], ["bytes/layer", (r) => formatBytes(r.bytes_per_layer)],
      ["pool", (r) => `×${r.pool_factor}`]], model.get("segments"), "segments"));
    events.replaceChildren(table([["step", (r) => r.step], ["event", (r) => r.event], ["kind", (r) => r.kind],
      ["policy", (r) => r.policy], ["count", (r) => r.count], ["freed", (r) => formatBytes(r.bytes_freed)],
      ["t (s)", (r) => (r.timestamp === null ? "" : r.timestamp.toFixed(1))]], model.get("events"), "events"));
    chart.replaceChildren(bytesChart(model.get("history")));
  };
  const traits = ["layers", "segments", "totals", "events", "history", "step"];
  for (const name of traits) model.on(`change:${name}`, update);
  model.on("change:live", schedule);
  model.on("change:poll_ms", schedule);
  update();
  schedule();
  return () => {
    for (const name of traits) model.off(`change:${name}`, update);
    model.off("change:live", schedule);
    model.off("change:poll_ms", schedule);
    if (timer) clearInterval(timer);
  };
}

export default { render };
