// Shared DOM helpers, prepended to each widget's ESM by widgets/_common.py `esm()` (anywidget loads one module per
// widget and there is no build step, so the widgets cannot import a shared file).

function h(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function formatBytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svgBox(width, height, testid) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("data-testid", testid);
  return svg;
}

// a line through `values` (each 0..1 of the height, 1 at the top), spread over the width
function polyline(values, width, height, color) {
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${((1 - v) * (height - 2) + 1).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", color);
  return line;
}

// p(silence) over time; data-values / data-count let tests read what is drawn
function sparkline(values, width = 220, height = 40) {
  const svg = svgBox(width, height, "p-silence-sparkline");
  svg.setAttribute("data-count", String(values.length));
  svg.setAttribute("data-values", values.map((v) => v.toFixed(4)).join(","));
  if (values.length > 0) svg.appendChild(polyline(values, width, height, "#2e86c1"));
  return svg;
}
