"""`e2v gateway`: an HTTP upload API and web page in front of Triton (the preprocessing tier).

Recordings arrive over HTTP (multipart or a raw body), are decoded and segmented here with
the client's own pipeline, and go to Triton over one shared connection. The gateway's
dependencies (FastAPI, uvicorn, python-multipart, prometheus-client) are the `gateway`
extra: nothing outside this package imports them, so `e2v` works without them.
"""
