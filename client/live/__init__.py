"""Live calls: per-party streaming VAD, interim windows and per-utterance finals over
WebSocket telephony streams (our own protocol, Genesys AudioHook, Twilio Media Streams).

The batch path's decode, resampler and VAD cutter do the work (client/audio.py,
client/segment.py); this package adds sessions, protocols and the delivery of events.
The protocol is documented in docs/live.md.
"""
