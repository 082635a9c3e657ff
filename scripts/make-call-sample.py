"""Make samples/call-8k-stereo.wav: a two-party call as telephony platforms record it.

Stereo G.711 mu-law at 8 kHz, the customer on the left channel and the agent on the
right (AudioHook's external/internal, Twilio's inbound/outbound), each turn spoken by
espeak-ng (apt package `espeak-ng`) in its own voice, with pauses between turns and one
short overlap. `e2v live samples/call-8k-stereo.wav` plays it into a gateway as two
parties. Run from the repository root: .venv/bin/python scripts/make-call-sample.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from e2v.client.audio import load_audio  # noqa: E402 - the repository's own decoder

OUT = ROOT / "samples" / "call-8k-stereo.wav"
RATE = 8000
VOICES = {"customer": "en+m3", "agent": "en+f3"}
# (party, seconds after the previous turn ends (negative: overlap), words)
TURNS = [
    (
        "customer",
        0.4,
        "Hello? I was charged twice for my internet this month, and nobody has called me back.",
    ),
    ("agent", 0.7, "I am sorry to hear that. Let me look at your account right away."),
    ("customer", 1.2, "This is the third time I am calling. I want a refund today."),
    ("agent", -0.3, "I understand. I have refunded the second charge."),
    ("customer", 0.8, "Thank you. That is all I wanted."),
]


def speak(text: str, voice: str, path: Path) -> np.ndarray:
    subprocess.run(
        [shutil.which("espeak-ng") or "espeak-ng", "-v", voice, "-s", "160", "-w", str(path), text],
        check=True,
    )
    return 0.8 * load_audio(path, RATE)


def main() -> None:
    parties = list(VOICES)
    with tempfile.TemporaryDirectory() as folder:
        placed, end = [], 0.0
        for number, (party, gap, text) in enumerate(TURNS):
            samples = speak(text, VOICES[party], Path(folder) / f"turn-{number}.wav")
            start = max(0.0, end + gap)
            placed.append((parties.index(party), round(start * RATE), samples))
            end = start + len(samples) / RATE
    call = np.zeros((2, round((end + 0.5) * RATE)), np.float32)
    for channel, offset, samples in placed:
        call[channel, offset : offset + len(samples)] += samples
    with av.open(str(OUT), "w", format="wav") as out:
        stream = out.add_stream("pcm_mulaw", rate=RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.clip(call, -1, 1), format="fltp", layout="stereo")
        frame.sample_rate = RATE
        for item in (frame, None):
            out.mux(stream.encode(item))
    print(f"{OUT.relative_to(ROOT)}: {call.shape[1] / RATE:.1f} s, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
