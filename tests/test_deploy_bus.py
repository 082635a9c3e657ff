"""deploy/k8s/bus (NATS JetStream) and components/bus (the gateway on it): rendered with
kubectl kustomize, validated against the Kubernetes schemas, and checked against each other,
the bus flags of `e2v gateway` and the NATS release the tests run."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
from e2v.client.live.bus_options import add_bus_arguments
from servers import NatsServer
from test_deploy import K8S_DIR, _validate, find, render

from e2v.contract import BUS_CLAIM_TTL_S

BUS = K8S_DIR / "bus"


@pytest.fixture(scope="module")
def gateway_on_bus() -> list[dict]:
    """deploy/k8s/gateway, which lists components/bus: the replicas share live calls."""
    gateway = K8S_DIR / "gateway"
    assert "../components/bus" in (gateway / "kustomization.yaml").read_text()
    return render(gateway)


def bus_args(docs: list[dict]) -> argparse.Namespace:
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parser = argparse.ArgumentParser()
    add_bus_arguments(parser)
    args = [a for a in container["args"] if a.startswith("--bus")]
    return parser.parse_args(args)  # an unknown --bus flag fails here


def test_bus_renders_and_validates():
    docs = render(BUS)
    assert {d["kind"] for d in docs} == {"ConfigMap", "StatefulSet", "Service", "NetworkPolicy"}
    assert _validate(docs) == []


def test_gateway_with_the_bus_component_renders_and_validates(gateway_on_bus):
    assert _validate(gateway_on_bus) == ["ServiceMonitor/emotion2vec-gateway"]


def test_the_gateway_reaches_the_bus_it_names(gateway_on_bus):
    bus = render(BUS)
    args = bus_args(gateway_on_bus)
    host, port = re.fullmatch(r"nats://([a-z0-9-]+):(\d+)", args.bus).groups()
    service = find(bus, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    # Egress from the gateway to the NATS pods on that port...
    egress = find(gateway_on_bus, "NetworkPolicy")["spec"]["egress"]
    nats_labels = find(bus, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    rules = [
        r
        for r in egress
        if r["to"][0].get("podSelector", {}).get("matchLabels", {}).items() <= nats_labels.items()
        and "podSelector" in r["to"][0]
        and r["to"][0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name") == "nats"
    ]
    assert [p["port"] for r in rules for p in r["ports"]] == [int(port)]
    # ...and NATS admits the client port from the gateway pods only.
    gateway_labels = find(gateway_on_bus, "Deployment")["spec"]["template"]["metadata"]["labels"]
    (client_rule,) = [r for r in find(bus, "NetworkPolicy")["spec"]["ingress"] if "from" in r]
    selector = client_rule["from"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= gateway_labels.items()
    assert [p["port"] for p in client_rule["ports"]] == [int(port)]


def test_the_credentials_come_from_the_secret_nats_checks(gateway_on_bus):
    args = bus_args(gateway_on_bus)
    pod = find(gateway_on_bus, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "bus-creds"]
    assert Path(args.bus_creds_file).parent == Path(mount["mountPath"]) and mount["readOnly"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "bus-creds"]
    assert [i["path"] for i in volume["secret"]["items"]] == [Path(args.bus_creds_file).name]
    nats = find(render(BUS), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    (key_ref,) = [
        e["valueFrom"]["secretKeyRef"]
        for e in nats["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    ]
    assert key_ref["name"] == volume["secret"]["secretName"]
    assert not any("--bus=" in a and "@" in a for a in pod["containers"][0]["args"])


def test_claims_expire_within_fifteen_seconds(gateway_on_bus):
    assert bus_args(gateway_on_bus).bus_claim_ttl_s <= 15 and BUS_CLAIM_TTL_S <= 15


def test_the_image_is_the_nats_release_the_tests_run():
    image = find(render(BUS), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    tag = re.fullmatch(r"nats:(\d+\.\d+\.\d+)-alpine", image["image"]).group(1)
    version = subprocess.run(
        [NatsServer.binary(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"v{tag}" in version


def test_the_servers_configuration_is_accepted_by_nats_server(tmp_path):
    """nats.conf from the ConfigMap, with the Secret's public key, parsed by nats-server."""
    conf = find(render(BUS), "ConfigMap")["data"]["nats.conf"].replace("/data", str(tmp_path))
    conf = conf.replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid"))
    (tmp_path / "nats.conf").write_text(conf)
    import nkeys

    seed = nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    env = {"POD_NAME": "nats-0", "GATEWAY_NKEY": public}
    result = subprocess.run(
        [NatsServer.binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_the_grace_period_holds_the_drain_and_the_hand_over(gateway_on_bus):
    """preStop, the drain, the close of what is left, then the hand-over of the calls
    closed at the deadline (their clients continue them elsewhere): all before SIGKILL."""
    from e2v.client.gateway.cli import GRACEFUL_SHUTDOWN_S
    from e2v.client.live.hub import DRAIN_FINISH_S, HANDOVER_WAIT_S

    pod = find(gateway_on_bus, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    parser = argparse.ArgumentParser()
    parser.add_argument("--live-drain-s", type=float, default=30.0)
    drain = parser.parse_known_args(container["args"])[0].live_drain_s
    needed = pre_stop + max(drain, GRACEFUL_SHUTDOWN_S) + DRAIN_FINISH_S + HANDOVER_WAIT_S
    assert pod["terminationGracePeriodSeconds"] > needed
