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
  if ($("channels").value === "split") {
    query.set("channels", "split");
    const parties = $("parties").value.trim();
    if (parties) query.set("parties", parties);
  }
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
  if (result.parties) {
    lanes(q(".timeline"), q(".segment-detail"), result);
    q(".conversation").hidden = false;
    q(".conversation").textContent = conversationText(result);
    q(".overall .emotion").title = `the emotion of ${result.reported_party}, named first`;
  } else {
    timeline(q(".timeline"), q(".segment-detail"), result);
  }
  legend(q(".legend"), result);
  for (const [label, score] of answers(result.scores)) {
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
    item.textContent = `ALERT ${alert.party ? `${alert.party}: ` : ""}${alert.label} reached ${pct(alert.max_score)} (threshold ` +
      `${pct(alert.threshold)}) at ${alert.start_s.toFixed(1)}-${alert.end_s.toFixed(1)} s, ` +
      `${alert.segments} segment(s)`;
    q(".alerts").append(item);
  }
  return node;
}

// Labels the model can never answer (`<unk>`, `unuse*`): left out of what the page shows;
// the JSON and CSV keep every column. A copy of e2v/contract.py's `is_answer_label` (the
// page test checks that they agree).
function predictable(label) {
  return !(label.startsWith("unuse") || label === "<unk>");
}

function answers(scores) {
  return Object.entries(scores || {})
    .filter(([label]) => predictable(label))
    .sort((a, b) => b[1] - a[1]);
}

function timeline(bar, detail, result) {
  const total = Math.max(Number(result.duration_s) || 0, 1e-6);
  for (const segment of result.segments || []) {
    const block = document.createElement("div");
    block.className = segment.interim ? "segment interim" : "segment";
    block.setAttribute("role", "listitem");
    block.style.left = `${(100 * segment.start_s) / total}%`;
    block.style.width = `${(100 * (segment.end_s - segment.start_s)) / total}%`;
    block.style.background = colour(segment.emotion);
    const scores = answers(segment.scores)
      .map(([label, score]) => `${label} ${pct(score)}`)
      .join(", ");
    const who = segment.party ? `${segment.party}, ` : "";
    const what = segment.interim ? " (interim)" : "";
    const text = `${who}${segment.start_s.toFixed(2)}-${segment.end_s.toFixed(2)} s: ` +
      `${segment.emotion ?? "?"} ${pct(segment.confidence)}${what}` +
      `${scores ? ` (${scores})` : ""}`;
    block.title = text;
    block.dataset.emotion = segment.emotion ?? "";
    block.addEventListener("mouseenter", () => { detail.textContent = text; });
    bar.append(block);
  }
}

// `channels=split`: one lane per party (channel), each with its own timeline.
function lanes(bar, detail, result) {
  const node = document.createElement("div");
  node.className = "lanes";
  for (const party of result.parties) {
    const lane = document.createElement("div");
    lane.className = "lane";
    lane.dataset.party = party.party;
    const name = document.createElement("span");
    name.className = "lane-name";
    const emotion = party.no_speech ? "no speech" : party.emotion ?? "-";
    name.textContent = `${party.party}: ${emotion} ${pct(party.confidence)}, ` +
      `${Number(party.speech_s).toFixed(1)} s speech`;
    const track = document.createElement("div");
    track.className = "timeline";
    track.setAttribute("role", "list");
    track.setAttribute("aria-label", `Emotion per segment of ${party.party}`);
    const segments = party.segments.map((s) => ({ ...s, party: party.party }));
    timeline(track, detail, { segments, duration_s: result.duration_s });
    lane.append(name, track);
    node.append(lane);
  }
  bar.replaceWith(node);
}

function conversationText(result) {
  const c = result.conversation || {};
  const s = (value) => `${Number(value).toFixed(1)} s`;
  return `overlap ${s(c.overlap_s)} · silence ${s(c.silence_s)} · ` +
    `longest silence ${s(c.longest_silence_s)}`;
}

function legend(node, result) {
  const all = [...(result.segments || []), ...(result.parties || []).flatMap((p) => p.segments)];
  const labels = new Set(all.map((s) => s.emotion).filter(Boolean));
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

// Live mode: the microphone through an AudioWorklet (live-worklet.js: 16 kHz pcm_s16le
// frames of 100 ms) over a WebSocket to /v1/live; the card's timeline fills in as events
// arrive: interim windows lighter, finals solid, alerts marked (docs/live.md).
const LIVE_MIN_SPAN_S = 10;
let live = null;

function liveUrl() {
  const url = new URL("v1/live", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = $("key").value.trim();
  if (key) url.searchParams.set("key", key); // browsers cannot set headers on a WebSocket
  return url.href;
}

function liveStart() {
  const start = { type: "start", encoding: "pcm_s16le", sample_rate: 16000, channels: 1 };
  const alert = $("alert").value.trim();
  if (alert) start.alerts = alert;
  return start;
}

async function toggleLive() {
  if (live) {
    live.stop();
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
    setStatus("Live needs a secure context (https or localhost), a microphone and AudioWorklet",
      true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
        autoGainControl: false },
    });
  } catch (error) {
    setStatus(`Microphone unavailable: ${error.message}`, true);
    return;
  }
  live = new LiveCall(stream);
  try {
    await live.begin();
  } catch (error) {
    live.end(`Live failed: ${error.message || error}`, true);
  }
}

class LiveCall {
  constructor(stream) {
    this.stream = stream;
    this.events = [];
    this.finals = [];
    this.interims = new Map(); // party -> its latest interim window
    this.alerts = [];
    this.heard = 0; // seconds of audio sent
    this.done = false;
  }

  async begin() {
    ({ context: this.context, node: this.node } = await audioGraph(this.stream));
    this.node.port.onmessage = (event) => this.onAudio(event.data);
    this.socket = new WebSocket(liveUrl());
    this.socket.binaryType = "arraybuffer";
    this.socket.addEventListener("open", () => this.socket.send(JSON.stringify(liveStart())));
    this.socket.addEventListener("message", (event) => this.onMessage(event.data));
    this.socket.addEventListener("close", (event) => this.onClose(event));
    this.socket.addEventListener("error", () => setStatus("Live: the connection failed", true));
    $("live").textContent = "Stop live";
    $("live").classList.add("on");
    $("record").disabled = true;
    setStatus("Live: connecting...");
  }

  onAudio(data) {
    if (data === "stopped") {
      if (this.socket.readyState === WebSocket.OPEN) {
        this.socket.send(JSON.stringify({ type: "stop" }));
      }
      return;
    }
    if (!this.started || this.socket.readyState !== WebSocket.OPEN) return;
    this.socket.send(data);
    this.heard += data.byteLength / 2 / 16000;
    $("record-time").textContent = `${this.heard.toFixed(0)} s`;
  }

  onMessage(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return;
    }
    if (event.type === "started") {
      this.started = event;
      this.card = liveCard(event);
      $("results").prepend(this.card);
      $("synthetic").hidden = !event.synthetic;
      setStatus(`Live: listening (call ${event.call_id}); press Stop live to finish`);
      return;
    }
    this.events.push(event);
    if (event.type === "result") this.interims.set(event.party, { ...event, interim: true });
    if (event.type === "utterance.end") {
      this.finals.push(event);
      const interim = this.interims.get(event.party);
      if (interim && interim.utterance === event.utterance) this.interims.delete(event.party);
    }
    if (event.type === "alert") this.alerts.push(event);
    if (event.type === "summary") this.summary = event;
    if (event.type === "error") {
      setStatus(`Live: ${event.message} (${event.error_kind}, ${event.code})`, true);
    }
    if (this.card) this.draw();
  }

  draw() {
    const q = (selector) => this.card.querySelector(selector);
    const ends = [this.heard, ...this.events.map((e) => Number(e.end_s) || 0)];
    // Whole tens of seconds, with room ahead of "now" (the timeline grows in steps).
    const span = LIVE_MIN_SPAN_S * Math.ceil((Math.max(...ends) + 0.5) / LIVE_MIN_SPAN_S);
    const segments = [...this.finals, ...this.interims.values()];
    const bar = q(".timeline");
    bar.replaceChildren();
    timeline(bar, q(".segment-detail"), { segments, duration_s: span });
    for (const alert of this.alerts) {
      const mark = document.createElement("div");
      mark.className = "alert-mark";
      mark.style.left = `${(100 * alert.start_s) / span}%`;
      mark.style.width = `${(100 * (alert.end_s - alert.start_s)) / span}%`;
      mark.title = `ALERT ${alert.label} ${pct(alert.score)}`;
      bar.append(mark);
    }
    const now = document.createElement("div");
    now.className = "now";
    now.title = "now";
    now.style.left = `${(100 * this.heard) / span}%`;
    bar.append(now);
    q(".axis .end").textContent = `${span.toFixed(0)} s`;
    const legendNode = q(".legend");
    legendNode.replaceChildren();
    legend(legendNode, { segments });
    for (const [kind, text] of [["interim", "interim (last window)"], ["alert-key", "alert"],
      ["now-key", "now"]]) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.className = kind;
      item.append(swatch, text);
      legendNode.append(item);
    }
    q(".alerts").replaceChildren(...this.alerts.map(alertItem));
    const latest = this.summary?.parties?.[0] ?? this.finals[this.finals.length - 1];
    if (latest) {
      q(".emotion").textContent = latest.no_speech ? "no speech" : latest.emotion ?? "-";
      q(".emotion").style.background = latest.emotion ? colour(latest.emotion) : "";
      q(".confidence").textContent = pct(latest.confidence);
    }
    q(".duration").textContent = `${this.finals.length} final(s), ` +
      `${this.events.filter((e) => e.type === "result").length} interim result(s)`;
  }

  stop() {
    if (this.stopping) return;
    this.stopping = true;
    $("live").disabled = true;
    setStatus("Live: finishing the last utterance...");
    this.stream.getTracks().forEach((track) => track.stop());
    this.node.port.postMessage("stop"); // the worklet sends its last frame, then "stopped"
  }

  onClose(event) {
    if (this.done) return;
    if (event.code === 1000 && this.summary) {
      this.end(`Live: done, ${this.finals.length} utterance(s)`);
      if (this.card) {
        const blob = new Blob([JSON.stringify(this.events, null, 2)],
          { type: "application/json" });
        this.card.querySelector(".download").href = URL.createObjectURL(blob);
        this.card.querySelector(".download").hidden = false;
      }
    } else {
      const reason = event.reason ? `: ${event.reason}` : "";
      this.end(`Live: the gateway closed the session (${event.code}${reason})`, true);
    }
  }

  end(message, isError = false) {
    this.done = true;
    this.stream.getTracks().forEach((track) => track.stop());
    if (this.context) this.context.close();
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    live = null;
    $("live").textContent = "Live";
    $("live").classList.remove("on");
    $("live").disabled = false;
    $("record").disabled = false;
    $("record-time").textContent = "";
    setStatus(message, isError);
  }
}

// Microphone -> worklet. A 16 kHz context first: the browser resamples (the worklet passes
// samples through); where it cannot (some browsers refuse a mic at another rate), the
// device rate, and the worklet resamples.
async function audioGraph(stream) {
  for (const options of [{ sampleRate: 16000 }, {}]) {
    let context = null;
    try {
      context = new AudioContext(options);
      await context.audioWorklet.addModule("static/live-worklet.js");
      const node = new AudioWorkletNode(context, "pcm-sender");
      context.createMediaStreamSource(stream).connect(node);
      node.connect(context.destination); // pulls the graph; the node outputs silence
      await context.resume();
      return { context, node };
    } catch (error) {
      if (context) context.close();
      if (!options.sampleRate) throw error;
    }
  }
}

function liveCard(started) {
  const node = $("result-template").content.firstElementChild.cloneNode(true);
  node.classList.add("live");
  if (started.synthetic) node.classList.add("is-synthetic");
  node.querySelector(".filename").textContent = `Live: microphone (call ${started.call_id})`;
  node.querySelector(".download").hidden = true;
  node.querySelector(".download").download = `${started.call_id}.json`;
  node.querySelector(".emotion").textContent = "listening...";
  return node;
}

function alertItem(alert) {
  const item = document.createElement("li");
  item.className = "alert";
  item.textContent = `ALERT ${alert.party ?? ""} ${alert.label} reached ${pct(alert.score)} ` +
    `(threshold ${pct(alert.threshold)}) at ${alert.start_s.toFixed(1)}-` +
    `${alert.end_s.toFixed(1)} s`;
  return item;
}

// Calls view: the live calls (GET /v1/calls: every replica's with --bus), polled every
// few seconds, each party's latest emotion, alerting calls first (the gateway's order).
// A click follows one call: its events over the subscription WebSocket, a lane per party.
const CALLS_EVERY_MS = 2000;
let callsTimer = null;
let followed = null;

function keyHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function toggleCalls() {
  const section = $("calls");
  section.hidden = !section.hidden;
  $("calls-toggle").classList.toggle("on", !section.hidden);
  clearInterval(callsTimer);
  callsTimer = null;
  if (section.hidden) {
    if (followed) followed.close();
    return;
  }
  refreshCalls();
  callsTimer = setInterval(refreshCalls, CALLS_EVERY_MS);
}

async function refreshCalls() {
  const status = $("calls-status");
  let data;
  try {
    const response = await fetch("v1/calls", { headers: keyHeaders() });
    data = await response.json();
    if (!response.ok) throw new Error(`${data.error} (${data.error_kind}, HTTP ${response.status})`);
  } catch (error) {
    status.textContent = `Calls: ${error.message || error}`;
    status.classList.add("error");
    return;
  }
  status.classList.remove("error");
  const alerting = data.calls.filter((call) => call.alerts.length).length;
  const where = data.fleet ? "across the fleet" : "on this gateway";
  status.textContent = `${data.calls.length} live call(s) ${where}` +
    (alerting ? `, ${alerting} alerting` : "");
  $("calls-body").replaceChildren(...data.calls.map(callRow));
}

function callRow(call) {
  const row = document.createElement("tr");
  row.className = call.alerts.length ? "call alerting" : "call";
  if (followed && followed.callId === call.call_id) row.classList.add("followed");
  row.dataset.callId = call.call_id;
  row.tabIndex = 0;
  const cell = (...content) => {
    const td = document.createElement("td");
    td.append(...content);
    row.append(td);
    return td;
  };
  const id = document.createElement("span");
  id.className = "call-id";
  id.textContent = call.call_id;
  cell(id, ` (${call.protocol}${call.state === "live" ? "" : `, ${call.state}`})`);
  cell(...call.parties.map((party) => partyChip(party, call.latest[party])));
  const last = call.alerts[call.alerts.length - 1];
  cell(last ? `${call.alerts.length}: ${last.party ?? ""} ${last.label} ${pct(last.score)}` : "-")
    .className = "alerts-cell";
  cell(call.replica);
  const age = Math.max(0, Date.now() / 1000 - call.started);
  cell(`${age < 60 ? age.toFixed(0) + " s" : (age / 60).toFixed(0) + " min"} ago`);
  const follow = () => followCall(call.call_id);
  row.addEventListener("click", follow);
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") follow();
  });
  return row;
}

function partyChip(party, latest) {
  const chip = document.createElement("span");
  chip.className = "party-chip";
  chip.dataset.party = party;
  chip.dataset.emotion = latest?.emotion ?? "";
  chip.textContent = latest ? `${party}: ${latest.emotion ?? "-"} ${pct(latest.confidence)}`
    : `${party}: -`;
  if (latest?.emotion) chip.style.background = colour(latest.emotion);
  return chip;
}

function followCall(callId) {
  if (followed) followed.close();
  followed = new FollowedCall(callId);
  for (const row of document.querySelectorAll("tr.call")) {
    row.classList.toggle("followed", row.dataset.callId === callId);
  }
}

class FollowedCall {
  constructor(callId) {
    this.callId = callId;
    this.finals = [];
    this.interims = new Map(); // party -> its latest interim window
    this.alerts = [];
    this.parties = [];
    this.end = 0;
    this.card = $("result-template").content.firstElementChild.cloneNode(true);
    this.card.classList.add("followed-call");
    this.card.dataset.callId = callId;
    this.card.querySelector(".filename").textContent = `Call ${callId}`;
    this.card.querySelector(".download").hidden = true;
    this.card.querySelector(".emotion").textContent = "following...";
    $("call-follow").replaceChildren(this.card);
    const url = new URL(`v1/calls/${encodeURIComponent(callId)}/events/ws`, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const key = $("key").value.trim();
    if (key) url.searchParams.set("key", key);
    this.socket = new WebSocket(url.href);
    this.socket.addEventListener("message", (event) => this.onEvent(JSON.parse(event.data)));
    this.socket.addEventListener("close", (event) => this.onClose(event));
  }

  onEvent(event) {
    for (const party of [event.party, ...(event.parties || []).map((p) => p.party)]) {
      if (party && !this.parties.includes(party)) this.parties.push(party);
    }
    this.end = Math.max(this.end, Number(event.end_s) || 0);
    if (event.type === "result") this.interims.set(event.party, { ...event, interim: true });
    if (event.type === "utterance.end") {
      this.finals.push(event);
      const interim = this.interims.get(event.party);
      if (interim && interim.utterance === event.utterance) this.interims.delete(event.party);
    }
    if (event.type === "alert") this.alerts.push(event);
    if (event.type === "summary") this.summary = event;
    if (event.type === "error") this.error = event;
    this.card.dataset.seq = event.seq;
    this.draw();
  }

  draw() {
    const q = (selector) => this.card.querySelector(selector);
    const span = LIVE_MIN_SPAN_S * Math.ceil((this.end + 0.5) / LIVE_MIN_SPAN_S);
    const segments = [...this.finals, ...this.interims.values()];
    const parties = this.parties.map((party) => ({
      party,
      segments: segments.filter((s) => s.party === party),
    }));
    const lanesNode = document.createElement("div");
    lanesNode.className = "lanes";
    for (const { party, segments: own } of parties) {
      const lane = document.createElement("div");
      lane.className = "lane";
      lane.dataset.party = party;
      const name = document.createElement("span");
      name.className = "lane-name";
      const latest = own.filter((s) => !s.interim).pop() ?? own[own.length - 1];
      name.textContent = `${party}: ${latest?.emotion ?? "-"} ${pct(latest?.confidence)}`;
      const track = document.createElement("div");
      track.className = "timeline";
      timeline(track, q(".segment-detail"), { segments: own, duration_s: span });
      lane.append(name, track);
      lanesNode.append(lane);
    }
    (q(".lanes") || q(".timeline")).replaceWith(lanesNode);
    q(".axis .end").textContent = `${span.toFixed(0)} s`;
    q(".alerts").replaceChildren(...this.alerts.map(alertItem));
    const legendNode = q(".legend");
    legendNode.replaceChildren();
    legend(legendNode, { segments });
    const ended = this.summary ? ", ended" : this.error ? `, ${this.error.error_kind}` : "";
    q(".emotion").textContent = `${this.finals.length} final(s)${ended}`;
    q(".duration").textContent = `${this.end.toFixed(1)} s`;
  }

  onClose(event) {
    if (this.closed) return;
    const why = this.summary ? "the call ended" : this.error ? this.error.message
      : `the subscription closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`;
    this.card.querySelector(".segment-detail").textContent = `Not following: ${why}`;
  }

  close() {
    this.closed = true;
    if (this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
  }
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
  $("live").addEventListener("click", toggleLive);
  $("calls-toggle").addEventListener("click", toggleCalls);
  $("origin").textContent = window.location.origin;
}

init();
