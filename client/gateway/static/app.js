// The gateway's page: upload or record, then draw the emotions over time.
// No framework, no external resources (the page works offline); data is only ever
// written with textContent, never parsed as HTML.
"use strict";

const COLOURS = {
  angry: "#d7263d", happy: "#f4c430", sad: "#1b6ca8", neutral: "#9aa5b1",
  fearful: "#7b3fa0", surprised: "#f08a24", disgusted: "#3a9d5d", other: "#6d6875",
};

const $ = (id) => document.getElementById(id);

function colour(label) {
  if (label in COLOURS) return COLOURS[label];
  let hash = 0;
  for (const ch of String(label)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 55% 50%)`;
}

function pct(value) {
  return value == null ? "" : `${(100 * value).toFixed(1)}%`;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function predictUrl() {
  const query = new URLSearchParams({ segment: $("segment").value });
  const alert = $("alert").value.trim();
  if (alert) query.set("alert", alert);
  return `predict?${query}`;
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const headers = {};
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  setStatus(`Analysing ${files.length === 1 ? files[0].name : files.length + " files"}...`);
  document.body.classList.add("busy");
  try {
    const response = await fetch(predictUrl(), { method: "POST", body: form, headers });
    let data;
    try {
      data = await response.json();
    } catch {
      throw new Error(`HTTP ${response.status}: the gateway did not answer with JSON`);
    }
    const results = data.results || [data];
    if (!response.ok && !data.filename) {
      const retry = response.headers.get("Retry-After");
      throw new Error(`${data.error} (${data.error_kind}, HTTP ${response.status})` +
        (retry ? `: retry in ${retry} s` : ""));
    }
    render(results);
    const failed = results.filter((r) => r.error).length;
    setStatus(failed ? `${failed} of ${results.length} file(s) failed` : "Done", failed > 0);
  } catch (error) {
    setStatus(String(error.message || error), true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function render(results) {
  const container = $("results");
  container.replaceChildren();
  $("synthetic").hidden = !results.some((r) => r.synthetic);
  for (const result of results) container.append(card(result));
}

function card(result) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  const q = (selector) => node.querySelector(selector);
  q(".filename").textContent = result.filename;
  const blob = new Blob([JSON.stringify(result, null, 2)], { type: "application/json" });
  q(".download").href = URL.createObjectURL(blob);
  q(".download").download = `${String(result.filename).replace(/[^\w.-]+/g, "_")}.json`;
  if (result.error) {
    q(".error").hidden = false;
    q(".error").textContent = `${result.error} (${result.error_kind})`;
    q(".overall").hidden = true;
    return node;
  }
  if (result.synthetic) node.classList.add("is-synthetic");
  const emotion = q(".emotion");
  emotion.textContent = result.no_speech ? "no speech found" : result.emotion ?? "embeddings only";
  emotion.style.background = result.emotion ? colour(result.emotion) : "";
  q(".confidence").textContent = result.confidence == null ? "" : pct(result.confidence);
  q(".duration").textContent = `${Number(result.duration_s).toFixed(1)} s`;
  q(".axis .end").textContent = `${Number(result.duration_s).toFixed(1)} s`;
  timeline(q(".timeline"), q(".segment-detail"), result);
  legend(q(".legend"), result);
  for (const [label, score] of Object.entries(result.scores || {}).sort((a, b) => b[1] - a[1])) {
    const item = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = pct(score);
    bar.style.background = colour(label);
    item.append(`${label} ${pct(score)}`, bar);
    q(".scores").append(item);
  }
  for (const alert of result.alerts || []) {
    const item = document.createElement("li");
    item.className = "alert";
    item.textContent = `ALERT ${alert.label} reached ${pct(alert.max_score)} (threshold ` +
      `${pct(alert.threshold)}) at ${alert.start_s.toFixed(1)}-${alert.end_s.toFixed(1)} s, ` +
      `${alert.segments} segment(s)`;
    q(".alerts").append(item);
  }
  return node;
}

function timeline(bar, detail, result) {
  const total = Math.max(Number(result.duration_s) || 0, 1e-6);
  for (const segment of result.segments || []) {
    const block = document.createElement("div");
    block.className = "segment";
    block.setAttribute("role", "listitem");
    block.style.left = `${(100 * segment.start_s) / total}%`;
    block.style.width = `${(100 * (segment.end_s - segment.start_s)) / total}%`;
    block.style.background = colour(segment.emotion);
    const scores = Object.entries(segment.scores || {})
      .sort((a, b) => b[1] - a[1])
      .map(([label, score]) => `${label} ${pct(score)}`)
      .join(", ");
    const text = `${segment.start_s.toFixed(2)}-${segment.end_s.toFixed(2)} s: ` +
      `${segment.emotion ?? "?"} ${pct(segment.confidence)}${scores ? ` (${scores})` : ""}`;
    block.title = text;
    block.dataset.emotion = segment.emotion ?? "";
    block.addEventListener("mouseenter", () => { detail.textContent = text; });
    bar.append(block);
  }
}

function legend(node, result) {
  const labels = new Set((result.segments || []).map((s) => s.emotion).filter(Boolean));
  for (const label of labels) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = colour(label);
    item.append(swatch, label);
    node.append(item);
  }
}

// Microphone: MediaRecorder gives WebM/Opus (or MP4 on Safari); the gateway decodes either.
let recorder = null;
async function toggleRecording() {
  const button = $("record");
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia) {
    setStatus("Recording needs a secure context (https or localhost) and a microphone", true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    setStatus(`Microphone unavailable: ${error.message}`, true);
    return;
  }
  const chunks = [];
  const started = Date.now();
  recorder = new MediaRecorder(stream);
  const timer = setInterval(() => {
    $("record-time").textContent = `${((Date.now() - started) / 1000).toFixed(0)} s`;
  }, 500);
  recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
  recorder.addEventListener("stop", () => {
    clearInterval(timer);
    stream.getTracks().forEach((track) => track.stop());
    const type = recorder.mimeType || "audio/webm";
    recorder = null;
    button.textContent = "Record";
    $("record-time").textContent = "";
    const extension = type.includes("mp4") ? "m4a" : type.includes("ogg") ? "ogg" : "webm";
    upload([new File(chunks, `recording.${extension}`, { type })]);
  });
  recorder.start();
  button.textContent = "Stop";
  setStatus("Recording... press Stop to analyse");
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    upload([...event.target.files]);
    event.target.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    upload([...event.dataTransfer.files]);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
  $("record").addEventListener("click", toggleRecording);
  $("origin").textContent = window.location.origin;
}

init();
