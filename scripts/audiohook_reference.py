"""Drive `/v1/audiohook` with the AudioHook reference implementation's own TypeScript client.

    python scripts/audiohook_reference.py ws://127.0.0.1:8080/v1/audiohook \\
        --wavfile samples/call-8k-stereo.wav --api-key KEY [--client-secret BASE64]

The client (purecloudlabs/audiohook-reference-implementation, MIT) is vendored under
tests/vendor/audiohook-reference/ without its lockfile (it points at a private registry).
It is copied to build/audiohook-client/ and `npm install`ed there on first use (git-ignored;
one shared node_modules for client/ and app/audiohook/, as the reference's layout needs),
then run through `script`, because it puts stdin in raw mode and needs a terminal. Prints
the client's log; exit status is the client's. tests/test_live_audiohook.py uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "tests" / "vendor" / "audiohook-reference"
BUILD = ROOT / "build" / "audiohook-client"
INSTALL_TIMEOUT_S = 600
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def available() -> str | None:
    """None when node, npm and script are installed, else what is missing."""
    missing = [tool for tool in ("node", "npm", "npx", "script") if shutil.which(tool) is None]
    return ", ".join(missing) or None


def _stamp() -> str:
    """A hash of the vendored sources: a changed copy is installed again."""
    digest = hashlib.sha256()
    for path in sorted(VENDORED.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(VENDORED)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def install(build: Path = BUILD) -> Path:
    """The client's directory under `build`, installed (npm install without a lockfile)."""
    stamp = build / ".installed"
    client = build / "client"
    if stamp.exists() and stamp.read_text() == _stamp() and (client / "node_modules").is_dir():
        return client
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(VENDORED, build)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=client,
        check=True,
        timeout=INSTALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    # app/audiohook/ resolves `uuid` and the node types from a node_modules above it.
    (build / "node_modules").symlink_to("client/node_modules")
    stamp.write_text(_stamp())
    return client


def run(
    uri: str,
    wavfile: Path,
    api_key: str,
    client_secret: str | None = None,
    timeout_s: float = 120.0,
    extra: tuple[str, ...] = (),
) -> tuple[int, str]:
    """(exit status, log without colours) of one reference client run against `uri`."""
    client = install()
    args = ["npx", "ts-node", "src/index.ts", "--uri", uri, "--api-key", api_key]
    args += ["--wavfile", str(Path(wavfile).resolve())]
    if client_secret is not None:
        args += ["--client-secret", client_secret]
    args += list(extra)
    # `script -c` takes one command line: quote each argument for its shell.
    command = " ".join(_quote(a) for a in args)
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=client,
        capture_output=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TS_NODE_TRANSPILE_ONLY": "true"},
    )
    text = (result.stdout + result.stderr).decode(errors="replace")
    return result.returncode, ANSI.sub("", text).replace("\r\n", "\n")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("uri")
    parser.add_argument("--wavfile", type=Path, required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--client-secret")
    args = parser.parse_args()
    if (problem := available()) is not None:
        print(f"error: needs {problem}", file=sys.stderr)
        return 2
    code, log = run(args.uri, args.wavfile, args.api_key, args.client_secret)
    print(log)
    return code


if __name__ == "__main__":
    sys.exit(main())
