// Webcam / LiveStream front end. While `running` is true: getUserMedia, draw the video to a canvas every
// 1/fps seconds, encode it as JPEG and send it as {type: "frame", ts: seconds since start} with the bytes as
// the message's one buffer. When `running` goes false (or on a {type: "stop"} message, or when the view is
// removed) every track is stopped, which releases the camera. LiveStream's extra traits (transcript,
// p_silence, frames_ingested) are shown when the model has them.

function render({ model, el }) {
  const live = model.get("transcript") !== undefined;
  const start = h("button", { "data-testid": "start", text: "Start" });
  const stop = h("button", { "data-testid": "stop", text: "Stop" });
  const video = h("video", { class: "mv-video", "data-testid": "video", muted: "", playsinline: "" });
  video.muted = true;
  const canvas = h("canvas", { style: "display: none" });
  const received = h("span", { "data-testid": "frames-received" });
  const dropped = h("span", { "data-testid": "frames-dropped" });
  const cameraError = h("div", { class: "mv-error", "data-testid": "camera-error" });
  const counters = h("div", { class: "mv-kv" }, [h("span", { class: "mv-muted", text: "frames received" }), received,
    h("span", { class: "mv-muted", text: "frames dropped" }), dropped]);
  const parts = [h("div", { class: "mv-controls" }, [start, stop]), h("div", { class: "mv-row" }, [video, counters]), cameraError, canvas];
  let ingested = null, transcript = null, spark = null, error = null;
  if (live) {
    ingested = h("span", { "data-testid": "frames-ingested" });
    counters.append(h("span", { class: "mv-muted", text: "frames ingested" }), ingested);
    spark = h("div");
    transcript = h("pre", { class: "mv-transcript", "data-testid": "transcript" });
    error = h("div", { class: "mv-error", "data-testid": "error" });
    parts.push(spark, transcript, error);
  }
  el.appendChild(h("div", { class: "mv-widget mv-webcam" }, parts));

  let stream = null;
  let timer = null;
  let t0 = 0;
  let encoding = false;

  const stopCamera = () => {
    if (timer) clearInterval(timer);
    timer = null;
    if (stream) for (const track of stream.getTracks()) track.stop();
    stream = null;
    video.srcObject = null;
    el.setAttribute("data-camera", "off");
  };
  const capture = () => {
    if (!stream || encoding || video.readyState < 2 || !video.videoWidth) return;
    const scale = Math.min(1, model.get("max_side") / Math.max(video.videoWidth, video.videoHeight));
    canvas.width = Math.max(1, Math.round(video.videoWidth * scale));
    canvas.height = Math.max(1, Math.round(video.videoHeight * scale));
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    const ts = (performance.now() - t0) / 1000;
    encoding = true;
    canvas.toBlob(async (blob) => {
      try {
        if (blob && stream) model.send({ type: "frame", ts }, undefined, [await blob.arrayBuffer()]);
      } finally {
        encoding = false;
      }
    }, "image/jpeg", 0.85);
  };
  const schedule = () => {
    if (timer) clearInterval(timer);
    timer = stream ? setInterval(capture, 1000 / Math.max(model.get("fps"), 0.01)) : null;
  };
  const startCamera = async () => {
    if (stream) return;
    let media;
    try {
      media = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (err) {
      model.send({ type: "camera_error", message: `${err.name || "Error"}: ${err.message || err}` });
      return;
    }
    if (!model.get("running") || stream) {  // stopped (or started twice) while the browser asked for permission
      for (const track of media.getTracks()) track.stop();
      return;
    }
    stream = media;
    video.srcObject = stream;
    try { await video.play(); } catch (err) { /* autoplay refusal: frames are still drawn from the stream */ }
    t0 = performance.now();
    el.setAttribute("data-camera", "on");
    schedule();
  };
  const onRunning = () => (model.get("running") ? startCamera() : stopCamera());
  const onCustom = (msg) => { if (msg && msg.type === "stop") stopCamera(); };
  start.addEventListener("click", () => { model.set("running", true); model.save_changes(); });
  stop.addEventListener("click", () => { stopCamera(); model.set("running", false); model.save_changes(); });

  const update = () => {
    const running = model.get("running");
    start.disabled = running;
    stop.disabled = !running;
    received.textContent = String(model.get("frames_received"));
    dropped.textContent = String(model.get("frames_dropped"));
    cameraError.textContent = model.get("camera_error");
    el.setAttribute("data-running", String(running));
    if (live) {
      ingested.textContent = String(model.get("frames_ingested"));
      transcript.textContent = model.get("transcript");
      spark.replaceChildren(sparkline(model.get("p_silence")));
      error.textContent = model.get("error");
    }
  };
  const traits = ["running", "frames_received", "frames_dropped", "camera_error"].concat(
    live ? ["frames_ingested", "transcript", "p_silence", "error"] : []);
  for (const name of traits) model.on(`change:${name}`, update);
  model.on("change:running", onRunning);
  model.on("change:fps", schedule);
  model.on("msg:custom", onCustom);
  update();
  if (model.get("running")) startCamera();
  return () => {
    stopCamera();
    for (const name of traits) model.off(`change:${name}`, update);
    model.off("change:running", onRunning);
    model.off("change:fps", schedule);
    model.off("msg:custom", onCustom);
  };
}

export default { render };
