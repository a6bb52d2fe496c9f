// StreamStepper front end: buttons send messages, everything shown comes from synced traits.
// Run is driven from here: the kernel answers each frame step with {type: "tick"}, and we ask for the
// next one while `running` is true, so Pause is always handled between two frames.

function render({ model, el }) {
  const button = (label, testid, type) => {
    const b = h("button", { "data-testid": testid, class: `mv-btn mv-${testid}`, text: label });
    b.addEventListener("click", () => model.send({ type }));
    return b;
  };
  const stepFrame = button("Step frame", "step-frame", "step_frame");
  const stepDecode = button("Step decode", "step-decode", "step_decode");
  const run = button("Run", "run", "run");
  const pause = button("Pause", "pause", "pause");
  const image = h("img", { class: "mv-frame", "data-testid": "frame", alt: "current frame" });
  const timestamp = h("div", { "data-testid": "timestamp" });
  const decision = h("div", { "data-testid": "decision" });
  const cache = h("div", { "data-testid": "cache", class: "mv-kv" });
  const spark = h("div");
  const scrubber = h("input", { type: "range", min: "1", max: "1", value: "1", "data-testid": "scrubber" });
  const stepLabel = h("span", { "data-testid": "step-count", class: "mv-muted" });
  const transcript = h("pre", { class: "mv-transcript", "data-testid": "transcript" });
  const status = h("div", { class: "mv-muted", "data-testid": "status" });
  const error = h("div", { class: "mv-error", "data-testid": "error" });

  scrubber.addEventListener("input", () => {
    model.set("step", Number(scrubber.value));
    model.save_changes();
  });

  el.appendChild(h("div", { class: "mv-widget mv-stepper" }, [
    h("div", { class: "mv-controls" }, [stepFrame, stepDecode, run, pause]),
    h("div", { class: "mv-row" }, [image, h("div", { class: "mv-col" }, [timestamp, decision, spark, cache])]),
    h("div", { class: "mv-controls" }, [scrubber, stepLabel]),
    transcript, status, error,
  ]));

  let url = null;
  const showFrame = () => {
    const bytes = model.get("frame");
    if (url) URL.revokeObjectURL(url);
    url = bytes && bytes.byteLength ? URL.createObjectURL(new Blob([bytes], { type: "image/png" })) : null;
    if (url) image.src = url; else image.removeAttribute("src");
  };
  const update = () => {
    const ts = model.get("timestamp");
    const step = model.get("step");
    const count = model.get("step_count");
    const running = model.get("running");
    timestamp.textContent = ts >= 0 ? `t = ${ts.toFixed(1)} s (frame ${model.get("frame_index")})` : "t = —";
    timestamp.setAttribute("data-seconds", ts >= 0 ? ts.toFixed(3) : "");
    const p = model.get("p_silence");
    decision.textContent = step > 0 ? `decision: ${JSON.stringify(model.get("decision"))}  p(silence) = ${p.toFixed(3)}` : "no decision yet";
    cache.replaceChildren();
    const c = model.get("cache") || {};
    for (const [label, key, fmt] of [["text tokens", "text_tokens"], ["vision frames", "vision_frames"],
      ["vision tokens", "vision_tokens"], ["cache bytes", "bytes", formatBytes]]) {
      if (c[key] === undefined) continue;
      cache.appendChild(h("span", { class: "mv-muted", text: label }));
      cache.appendChild(h("span", { "data-testid": `cache-${key}`, text: fmt ? fmt(c[key]) : String(c[key]) }));
    }
    spark.replaceChildren(sparkline(model.get("p_silence_history")));
    scrubber.max = String(Math.max(count, 1));
    scrubber.value = String(Math.max(step, 1));
    scrubber.disabled = count === 0;
    stepLabel.textContent = `step ${step} / ${count}`;
    transcript.textContent = model.get("transcript");
    status.textContent = model.get("status");
    error.textContent = model.get("error");
    const left = model.get("frames_total") - model.get("frames_pushed");
    stepFrame.disabled = running || left <= 0;
    run.disabled = running || left <= 0;
    stepDecode.disabled = running;
    pause.disabled = !running;
    el.setAttribute("data-running", String(running));
  };
  const onCustom = (msg) => {
    if (msg && msg.type === "tick" && model.get("running")) model.send({ type: "tick" });
  };

  model.on("change:frame", showFrame);
  const traits = ["timestamp", "step", "step_count", "running", "decision", "p_silence", "p_silence_history",
    "cache", "transcript", "status", "error", "frames_pushed", "frames_total", "frame_index"];
  for (const name of traits) model.on(`change:${name}`, update);
  model.on("msg:custom", onCustom);
  showFrame();
  update();
  return () => {
    model.off("change:frame", showFrame);
    for (const name of traits) model.off(`change:${name}`, update);
    model.off("msg:custom", onCustom);
    if (url) URL.revokeObjectURL(url);
  };
}

export default { render };
