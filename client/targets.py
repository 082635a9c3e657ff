"""What `--url` means: one Triton server, or a fleet of replicas behind one target.

gRPC (the default protocol) takes any gRPC target, and the channel balances every request
over the addresses it resolves with gRPC's `round_robin` policy:

- `HOST:PORT`: resolved by DNS (every A/AAAA record is a replica).
- `dns:///NAME:PORT`: the same, written out; a Kubernetes headless Service's name returns
  one record per ready pod (docs/deploy.md, "A fleet of Triton replicas").
- `ipv4:10.0.0.1:8001,10.0.0.2:8001` (or `ipv6:[::1]:8001,...`): a static list.
- `IP:PORT,IP:PORT`: a static list of IP literals, read as the `ipv4:`/`ipv6:` list.

HTTP takes `HOST:PORT[,HOST:PORT...]` (an `http://` prefix is allowed) and the client
itself takes the replicas in turn (client/http_replicas.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import unquote

# Target schemes gRPC resolves itself; anything else with "://" or a scheme is refused.
GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
MAX_TARGET_CHARS = 4096
MAX_REPLICAS = 256


class TargetError(ValueError):
    """A --url that names no Triton the protocol can reach; the message says what would."""


@dataclass(frozen=True)
class Target:
    text: str  # as given
    protocol: str
    channel: str  # gRPC: the channel's target; HTTP: ""
    urls: tuple[str, ...]  # HTTP: HOST:PORT per replica; gRPC: the static list, or ()

    @property
    def fleet(self) -> bool:
        """Several replicas (a list or a DNS name written as one): the summaries name them."""
        return len(self.urls) > 1 or self.channel.startswith("dns:")

    async def replicas(self) -> list[str]:
        """The replicas' addresses now, as the channel sees them: a static list as given, a
        `dns:///NAME:PORT` resolved; a plain HOST:PORT (or another scheme) is one replica."""
        if self.urls or not self.channel.startswith("dns:"):
            return list(self.urls) or [self.text]
        host, port = split_host_port(self.channel.split("/", 3)[-1])
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(address_text(str(info[4][0]), port) for info in found))


def parse_target(text: str, protocol: str) -> Target:
    text = text.strip()
    if not text:
        raise TargetError("the Triton target is empty: give HOST:PORT, dns:///NAME:PORT or a list")
    if len(text) > MAX_TARGET_CHARS:
        raise TargetError(f"the Triton target is longer than {MAX_TARGET_CHARS} characters")
    if protocol == "http":
        return _http_target(text)
    return _grpc_target(text)


def _grpc_target(text: str) -> Target:
    lower = text.lower()
    if lower.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = text.partition(":")
        urls = tuple(_ip_port(part, text) for part in _split_list(rest, text))
        return Target(text, "grpc", text, urls)
    if lower.startswith(GRPC_SCHEMES):
        return Target(text, "grpc", text, ())
    if "://" in text:
        raise TargetError(
            f"Triton target {text}: gRPC targets are HOST:PORT, dns:///NAME:PORT or "
            "ipv4:IP:PORT,IP:PORT (for an http:// URL, give --protocol http)"
        )
    if "," not in text:
        split_host_port(text, text)
        return Target(text, "grpc", text, ())
    urls = tuple(_ip_port(part, text) for part in _split_list(text, text))
    families = {ipaddress.ip_address(split_host_port(u)[0].strip("[]")).version for u in urls}
    if len(families) > 1:
        raise TargetError(f"Triton target {text}: one list holds IPv4 or IPv6 addresses, not both")
    scheme = "ipv4" if families == {4} else "ipv6"
    return Target(text, "grpc", f"{scheme}:{','.join(urls)}", urls)


def _http_target(text: str) -> Target:
    if text.lower().startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        raise TargetError(
            f"Triton target {text}: that is a gRPC target; HTTP takes HOST:PORT[,HOST:PORT...]"
        )
    urls = []
    for part in _split_list(text, text):
        if part.lower().startswith("https://"):
            raise TargetError(f"Triton target {text}: HTTPS is not supported; give HOST:PORT")
        part = part.removeprefix("http://").removeprefix("HTTP://").rstrip("/")
        split_host_port(part, text)
        urls.append(part)
    if len(set(urls)) < len(urls):
        raise TargetError(f"Triton target {text}: a replica is listed twice")
    return Target(text, "http", "", tuple(urls))


def _split_list(text: str, whole: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise TargetError(f"Triton target {whole}: an empty entry in the list")
    if len(parts) > MAX_REPLICAS:
        raise TargetError(f"Triton target {whole}: more than {MAX_REPLICAS} replicas")
    return parts


def _ip_port(part: str, whole: str) -> str:
    """`IP:PORT` or `[IPv6]:PORT` of a static list, normalised; a host name is refused (a
    static gRPC list holds addresses: a name with several records is dns:///NAME:PORT)."""
    host, port = split_host_port(part, whole)
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise TargetError(
            f"Triton target {whole}: {host} is not an IP address; a list of replicas names IPs "
            "(for a name with one record per replica, give dns:///NAME:PORT)"
        ) from None
    return address_text(str(address), port)


def split_host_port(text: str, whole: str | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"Triton target {whole or text}: {text!r} is not HOST:PORT")
    return host, int(port)


def address_text(ip: str, port: int) -> str:
    """`IP:PORT`, with IPv6 in brackets: how replicas are named in metrics and messages."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def channel_address(address: str) -> str:
    """A replica's own gRPC target (`ipv4:IP:PORT`), to ask it alone."""
    return ("ipv6:" if address.startswith("[") else "ipv4:") + address


def subchannel_address(channelz_target: str) -> str:
    """`ipv4:1.2.3.4:8001` / `ipv6:%5B::1%5D:8001` (a subchannel, in channelz) -> IP:PORT."""
    return unquote(channelz_target.split(":", 1)[1]) if ":" in channelz_target else channelz_target
