// The page's live mode, on the audio thread: microphone samples -> 16 kHz pcm_s16le frames
// of 100 ms, posted to the page, which sends them over the /v1/live WebSocket.
// The page asks for a 16 kHz AudioContext, so the browser's own resampler does the work and
// this passes samples through; a browser that keeps its device rate gets linear
// interpolation after a moving-average low-pass here (good enough for a demo, not for
// scores equal to `e2v classify`, which the CLI's `e2v live` gives).
"use strict";

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 1600; // 100 ms

class PcmSender extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.taps = Math.max(1, Math.round(this.step));
    this.history = new Float32Array(this.taps);
    this.slot = 0;
    this.sum = 0;
    this.at = 0; // read position (in input samples) of the next output sample
    this.previous = 0;
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data === "stop") {
        this.post();
        this.stopped = true;
        this.port.postMessage("stopped");
      }
    };
  }

  push(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.frame[this.filled++] = Math.round(clipped * 32767);
    if (this.filled === FRAME_SAMPLES) this.post();
  }

  post() {
    if (!this.filled) return;
    const out = this.frame.slice(0, this.filled);
    this.port.postMessage(out.buffer, [out.buffer]);
    this.filled = 0;
  }

  lowPassed(input) {
    if (this.taps === 1) return input;
    const out = new Float32Array(input.length);
    for (let i = 0; i < input.length; i++) {
      this.sum += input[i] - this.history[this.slot];
      this.history[this.slot] = input[i];
      this.slot = (this.slot + 1) % this.taps;
      out[i] = this.sum / this.taps;
    }
    return out;
  }

  process(inputs) {
    if (this.stopped) return false;
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    if (this.step === 1) {
      for (const value of channel) this.push(value);
      return true;
    }
    const input = this.lowPassed(channel);
    // `at` counts from this block's first sample; position -1 is the last block's last.
    while (Math.floor(this.at) + 1 < input.length) {
      const whole = Math.floor(this.at);
      const before = whole < 0 ? this.previous : input[whole];
      this.push(before + (input[whole + 1] - before) * (this.at - whole));
      this.at += this.step;
    }
    this.at -= input.length;
    this.previous = input[input.length - 1];
    return true;
  }
}

registerProcessor("pcm-sender", PcmSender);
