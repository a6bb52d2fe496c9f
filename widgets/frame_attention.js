// FrameAttentionView front end: click a token, see its attention mass per frame (bars over thumbnails),
// the chosen frame's per-patch heatmap and the token x frame visibility staircase. All numbers come from
// the kernel (traits `bars`, `heatmap`, `visibility`); choices go back as traits.

const THUMB = 40;

function choose(model, name, value) {
  model.set(name, value);
  model.save_changes();
}

function select(testid, options, current, onChange) {
  const node = h("select", { "data-testid": testid });
  for (const [value, label] of options) {
    const option = h("option", { value: String(value), text: label });
    if (value === current) option.selected = true;
    node.appendChild(option);
  }
  node.addEventListener("change", () => onChange(Number(node.value)));
  return node;
}

function barChart(model, bars, shownFrame) {
  const width = Math.max(bars.length * (THUMB + 2), 120);
  const height = 90;
  const svg = svgBox(width, height, "frame-bars");
  svg.setAttribute("data-token", String(model.get("token")));
  svg.setAttribute("data-bars", bars.map((v) => v.toFixed(4)).join(","));
  const max = Math.max(1e-9, ...bars);
  bars.forEach((value, f) => {
    const rect = document.createElementNS(SVG_NS, "rect");
    const barHeight = (value / max) * (height - 14);
    rect.setAttribute("x", String(f * (THUMB + 2) + 4));
    rect.setAttribute("y", String(height - barHeight));
    rect.setAttribute("width", String(THUMB - 8));
    rect.setAttribute("height", String(barHeight));
    rect.setAttribute("fill", f === shownFrame ? "#f5b041" : "#2e86c1");
    rect.setAttribute("data-testid", `bar-${f}`);
    rect.setAttribute("data-value", value.toFixed(4));
    rect.style.cursor = "pointer";
    rect.addEventListener("click", () => choose(model, "frame", f));
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `frame ${f}: ${(value * 100).toFixed(1)}%`;
    rect.appendChild(title);
    svg.appendChild(rect);
  });
  return svg;
}

function heatmapView(model, frames) {
  const map = model.get("heatmap") || {};
  const frame = frames[map.frame] || {};
  const size = 224;
  const box = h("div", { style: `position: relative; width: ${size}px; height: ${size}px;` });
  if (frame.thumb) box.appendChild(h("img", { src: frame.thumb, class: "mv-frame", style: "position: absolute; left: 0; top: 0;" }));
  const canvas = h("canvas", { width: String(size), height: String(size), "data-testid": "heatmap",
    "data-frame": String(map.frame), style: "position: absolute; left: 0; top: 0;" });
  canvas.setAttribute("data-values", (map.values || []).map((v) => v.toFixed(4)).join(","));
  const ctx = canvas.getContext && canvas.getContext("2d");
  const values = map.values || [];
  if (ctx && values.length) {
    const max = Math.max(1e-9, ...values);
    const cw = size / map.cols;
    const ch = size / map.rows;
    values.forEach((v, k) => {
      ctx.fillStyle = `rgba(255, 80, 0, ${(0.75 * v / max).toFixed(3)})`;
      ctx.fillRect((k % map.cols) * cw, Math.floor(k / map.cols) * ch, cw, ch);
    });
  }
  box.appendChild(canvas);
  const extra = (map.extra || []).map((v) => v.toFixed(3)).join(", ");
  const ts = frame.timestamp === null || frame.timestamp === undefined ? "" : ` at ${frame.timestamp.toFixed(1)} s`;
  return h("div", { class: "mv-col" }, [box, h("span", { class: "mv-muted", text: `frame ${map.frame}${ts}` + (extra ? ` (extra tokens: ${extra})` : "") })]);
}

function staircase(model, tokens, rows) {
  const frames = rows.length ? rows[0].length : 0;
  const cell = 4;
  const canvas = h("canvas", { width: String(Math.max(frames * cell, 1)), height: String(Math.max(rows.length * 2, 1)),
    "data-testid": "visibility", "data-rows": String(rows.length), "data-frames": String(frames),
    style: "align-self: flex-start; image-rendering: pixelated;" });  // drawn at its own size, never stretched
  const ctx = canvas.getContext && canvas.getContext("2d");
  const chosen = model.get("token");
  if (ctx) {
    rows.forEach((row, r) => {
      const selected = tokens[r] && tokens[r].i === chosen;
      ctx.fillStyle = selected ? "#f5b041" : "#5d6d7e";
      for (let f = 0; f < row.length; f++) {
        if (row[f] === "1") ctx.fillRect(f * cell, r * 2, cell, 2);
      }
    });
  }
  return h("div", { class: "mv-col" }, [h("span", { class: "mv-muted", text: "visibility: tokens (down) × frames (across)" }), canvas]);
}

function render({ model, el }) {
  const controls = h("div", { class: "mv-controls" });
  const tokens = h("div", { class: "mv-tokens", "data-testid": "tokens" });
  const chart = h("div", { class: "mv-col" });
  const heat = h("div");
  const stairs = h("div");
  el.appendChild(h("div", { class: "mv-widget mv-attention" }, [controls, tokens, chart, h("div", { class: "mv-row" }, [heat, stairs])]));

  const drawControls = () => {
    const layers = [[-1, "mean of layers"], ...model.get("layers").map((l) => [l, `layer ${l}`])];
    const heads = [[-1, "mean of heads"], ...Array.from({ length: model.get("num_heads") }, (_, i) => [i, `head ${i}`])];
    const prompt = h("input", { type: "checkbox", "data-testid": "show-prompt" });
    prompt.checked = model.get("show_prompt");
    prompt.addEventListener("change", () => choose(model, "show_prompt", prompt.checked));
    controls.replaceChildren(
      select("layer-select", layers, model.get("layer"), (v) => choose(model, "layer", v)),
      select("head-select", heads, model.get("head"), (v) => choose(model, "head", v)),
      h("label", {}, [prompt, document.createTextNode(" show prompt")]),
      h("span", { class: "mv-muted", "data-testid": "chosen-token", text: `token ${model.get("token")}` }));
  };
  const drawTokens = () => {
    const chosen = model.get("token");
    tokens.replaceChildren(...model.get("tokens").map((tok) => {
      const frame = tok.frame >= 0 ? model.get("frames")[tok.frame] : null;
      const label = frame ? `▣${frame.timestamp === null ? tok.frame : frame.timestamp.toFixed(1) + "s"}` : tok.text;
      const span = h("span", { class: "mv-token" + (frame ? " mv-frame-token" : "") + (tok.i === chosen ? " mv-selected" : ""),
        "data-testid": `token-${tok.i}`, "data-index": String(tok.i), title: `${tok.i}: ${JSON.stringify(tok.text)}`, text: label });
      span.addEventListener("click", () => choose(model, "token", tok.i));
      return span;
    }));
  };
  const drawChart = () => {
    const bars = model.get("bars");
    const map = model.get("heatmap") || {};
    const frames = model.get("frames");
    const thumbs = h("div", { class: "mv-thumbs" }, frames.map((frame) => {
      const item = h("div", { class: "mv-thumb" + (frame.index === map.frame ? " mv-selected" : ""), "data-testid": `thumb-${frame.index}`,
        style: `width: ${THUMB}px` });
      if (frame.thumb) item.appendChild(h("img", { src: frame.thumb, alt: `frame ${frame.index}` }));
      item.appendChild(h("span", { text: frame.timestamp === null ? `#${frame.index}` : `${frame.timestamp.toFixed(1)}s` }));
      item.addEventListener("click", () => choose(model, "frame", frame.index));
      return item;
    }));
    chart.replaceChildren(barChart(model, bars, map.frame), thumbs);
    heat.replaceChildren(heatmapView(model, frames));
    stairs.replaceChildren(staircase(model, model.get("tokens"), model.get("visibility")));
  };
  const onToken = () => { drawControls(); drawTokens(); drawChart(); };
  const listeners = [["change:token", onToken], ["change:tokens", onToken], ["change:layer", drawControls],
    ["change:head", drawControls], ["change:show_prompt", drawControls], ["change:bars", drawChart],
    ["change:heatmap", drawChart], ["change:visibility", drawChart], ["change:frames", onToken]];
  for (const [event, fn] of listeners) model.on(event, fn);
  onToken();
  return () => { for (const [event, fn] of listeners) model.off(event, fn); };
}

export default { render };
