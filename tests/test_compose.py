"""The docker-compose stack without Docker: compose file validated, its Orthanc configs and loader run for real."""

# `docker-compose config` checks the compose file; the very JSON files the containers mount
# run here as Orthanc processes (only ports, storage and peer host names changed), are filled
# by conf/compose-loader.py and drained by the controller with conf/transfer.compose.yaml.

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, _new_orthanc_command, run_cli

from dicom_transfer.config import load_config
from dicom_transfer.errors import OrthancError, TransientOrthancError
from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.stack import HOST, OrthancProcess, OrthancSpec, launch_orthanc, orthanc_command

pytestmark = pytest.mark.integration

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CONF = REPO_ROOT / "conf"
SHIPPED = {"pacs": CONF / "orthanc-pacs.json", "centre": CONF / "orthanc-centre.json",
           "relay": CONF / "orthanc-relay.json"}  # fmt: skip
TRANSFER_YAML = CONF / "transfer.compose.yaml"
RELAY_YAML = CONF / "transfer.relay.compose.yaml"
LOADER = CONF / "compose-loader.py"
SERVICES = {"pacs", "pacs-loader", "centre", "controller", "relay", "controller-relay"}
ORTHANC_SERVICES = ("pacs", "centre", "relay")
USER = "transfer"
# What must differ when both Orthancs share one machine; every other key runs as shipped.
PER_MACHINE_KEYS = {"HttpPort", "DicomPort", "StorageDirectory", "IndexDirectory", "DicomModalities"}


# ---------------------------------------------------------------------------------------
# docker-compose config


def compose(*args: str, password: str | None) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose -f docker-compose.yml ARGS` with ORTHANC_PASSWORD set (or unset)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed")
    env = {k: v for k, v in os.environ.items() if k != "ORTHANC_PASSWORD"}
    if password is not None:
        env["ORTHANC_PASSWORD"] = password
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever form `docker-compose config` printed."""
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_config_is_valid() -> None:
    """`docker-compose config` accepts the file: its services (relay's behind a profile), TCP_NODELAY=1, passwords."""
    res = compose("config", password="compose-test-pw")
    assert res.returncode == 0, res.stderr
    config = yaml.safe_load(res.stdout)
    services = config["services"]
    assert set(services) == SERVICES
    for name in (*ORTHANC_SERVICES, "controller", "pacs-loader"):
        assert environment(services[name]).get("TCP_NODELAY") == "1", name
    for name in ORTHANC_SERVICES:
        image, _, tag = services[name]["image"].partition(":")
        assert image in ("jodogne/orthanc", "orthancteam/orthanc") and tag, services[name]["image"]
        assert tuple(int(p) for p in tag.split(".")[:2]) >= (1, 12), tag
        assert environment(services[name])["ORTHANC_PASSWORD"] == "compose-test-pw"
        mounts = services[name]["volumes"]
        assert f"{SHIPPED[name]}:/etc/orthanc/orthanc.json:ro" in mounts, mounts
    controller = services["controller"]
    assert environment(controller)["DICOM_TRANSFER_LOCAL_PASSWORD"] == "compose-test-pw"
    assert controller["command"] == [
        "--batch", "/data/series.csv", "--config", "/app/conf/transfer.compose.yaml", "--report", "/data/report.json",
    ]  # fmt: skip
    assert controller["depends_on"]["pacs-loader"] == {"condition": "service_completed_successfully"}
    assert any(v.endswith(":/data:rw") or v.endswith(":/data") for v in controller["volumes"])
    assert services["pacs-loader"]["entrypoint"] == ["python", "conf/compose-loader.py"]
    relay = services["controller-relay"]
    assert services["relay"]["profiles"] == ["relay"] and relay["profiles"] == ["relay"]
    assert environment(relay)["TCP_NODELAY"] == "1"
    assert environment(relay)["DICOM_TRANSFER_LOCAL_PASSWORD"] == "compose-test-pw"
    assert environment(relay)["DICOM_TRANSFER_DESTINATION_PASSWORD"] == "compose-test-pw"
    assert relay["command"][:4] == ["--batch", "/data/series.csv", "--config", "/app/conf/transfer.relay.compose.yaml"]
    assert set(relay["depends_on"]) == {"pacs-loader", "relay", "centre"}


def test_compose_config_requires_password() -> None:
    """Without ORTHANC_PASSWORD, `docker-compose config` fails and says what to set."""
    res = compose("config", password=None)
    assert res.returncode != 0
    assert "set ORTHANC_PASSWORD" in res.stderr


def test_dockerfile_matches_compose() -> None:
    """The Dockerfile copies what exists, runs as non-root, and its entrypoint is `python main.py`."""
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    assert [line for line in lines if line.startswith("FROM ")][0].startswith("FROM python:3.11-slim")
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), line
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["python", "main.py"]' in lines
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv/", "demo-run/", "bench/out/", ".pytest_cache/"} <= ignored
    assert not {"conf/", "dicom_transfer/", "main.py", "requirements.txt"} & ignored


# ---------------------------------------------------------------------------------------
# The controller's config


def test_relay_compose_yaml_loads() -> None:
    """conf/transfer.relay.compose.yaml: relay mode, local = the relay service, destination = the centre, known AETs."""
    cfg = load_config(RELAY_YAML, env={})
    assert cfg.transfer.mode == "relay"
    assert (cfg.local.url, cfg.destination_url()) == ("http://relay:8042", "http://centre:8042")
    relay, pacs = (json.loads(SHIPPED[n].read_text()) for n in ("relay", "pacs"))
    assert cfg.source.modality in relay["DicomModalities"]
    assert [relay["DicomAet"], "relay", 4242] in pacs["DicomModalities"].values()  # the PACS may move to it
    assert relay["ConcurrentJobs"] >= max(cfg.transfer.max_in_flight, 2)


def test_transfer_compose_yaml_loads() -> None:
    """conf/transfer.compose.yaml is valid and names the compose services."""
    cfg = load_config(TRANSFER_YAML, env={})
    assert cfg.local.url == "http://centre:8042"
    assert cfg.local.username == USER
    assert cfg.source.modality == "PACS"
    assert cfg.destination.aet == "CENTRE"
    assert cfg.destination_url() == "http://centre:8042"
    centre = json.loads(SHIPPED["centre"].read_text())
    assert cfg.source.modality in centre["DicomModalities"]
    assert USER in centre["RegisteredUsers"]
    # The centre runs enough jobs for the configured moves in flight (DESIGN: > 2 needs more).
    assert centre["ConcurrentJobs"] >= max(cfg.transfer.max_in_flight, 2)


# ---------------------------------------------------------------------------------------
# The shipped Orthanc configs, run for real


@pytest.fixture(params=["host", "new"])
def orthanc_cmd(request: pytest.FixtureRequest) -> list[str]:
    """The Debian Orthanc (1.10.1) and the newer one (1.12.x, as in the compose images)."""
    return orthanc_command() if request.param == "host" else _new_orthanc_command()


def test_orthanc_configs_name_known_options(orthanc_cmd: list[str], tmp_path: Path) -> None:
    """Every option in conf/orthanc-*.json is in that Orthanc's own default configuration (no typo passes)."""
    default = tmp_path / "default.json"
    made = subprocess.run([*orthanc_cmd, f"--config={default}"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and default.exists(), made.stderr
    # Options in the default file, set or commented out ("// "Key" : ..."): Orthanc warns
    # about no unknown key, so this is where a misspelt one would be caught.
    known = set(re.findall(r'^\s*(?://\s*)?"(\w+)"\s*:', default.read_text(), re.MULTILINE))
    for path in SHIPPED.values():
        shipped = json.loads(path.read_text())
        unknown = [key for key in shipped if key not in known]
        assert not unknown, f"{path.name}: options unknown to {' '.join(orthanc_cmd)}: {unknown}"
        assert shipped["OverwriteInstances"] is False
        assert shipped["JobsHistorySize"] >= 100
        assert shipped["RegisteredUsers"] == {USER: "${ORTHANC_PASSWORD}"}


def machine_config(shipped: dict[str, Any], spec: OrthancSpec, workdir: Path, peers: dict[str, OrthancSpec]) -> dict:
    """The shipped config with only what must differ on one machine changed."""
    config = copy.deepcopy(shipped)
    storage = str(workdir / f"{spec.name}-db")
    config.update(HttpPort=spec.http_port, DicomPort=spec.dicom_port, StorageDirectory=storage, IndexDirectory=storage)
    modalities = {}
    for name, (aet, host, port) in shipped["DicomModalities"].items():
        assert host in peers and port == 4242, f"{spec.name}: modality {name} is not a compose service: {host}:{port}"
        assert aet == peers[host].aet, f"{spec.name}: modality {name} has AET {aet}, {host} is {peers[host].aet}"
        modalities[name] = [aet, HOST, peers[host].dicom_port]
    config["DicomModalities"] = modalities
    return config


def wait_ready(process: OrthancProcess, rest: OrthancRest, timeout_s: float = 30) -> dict[str, Any]:
    """Poll `GET /system` with credentials (stack.wait_ready cannot authenticate) until ours answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.running, f"{process.spec.name} exited:\n{process.log_tail()}"
        try:
            system = rest.system()
        except TransientOrthancError:
            assert time.monotonic() < deadline, f"{process.spec.name} not ready:\n{process.log_tail()}"
            time.sleep(0.05)
            continue
        assert (system["Name"], system["DicomAet"]) == (process.spec.name, process.spec.aet)
        return system


def run_loader(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run conf/compose-loader.py as the pacs-loader container would (`python conf/compose-loader.py`)."""
    return subprocess.run(
        [sys.executable, str(LOADER)], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def series_count(rest: OrthancRest, series_uid: str) -> int:
    """How many instances of the series this Orthanc holds."""
    found = [f["ID"] for f in rest.post("/tools/lookup", content=series_uid) if f["Type"] == "Series"]
    return len(rest.get(f"/series/{found[0]}")["Instances"]) if found else 0


def test_shipped_configs_transfer_end_to_end(
    orthanc_cmd: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conf/orthanc-*.json as host Orthancs, filled by compose-loader.py: the controller moves every series."""
    password = secrets.token_hex(12)
    monkeypatch.setenv("ORTHANC_PASSWORD", password)  # Orthanc substitutes ${ORTHANC_PASSWORD} at start
    shipped = {name: json.loads(path.read_text()) for name, path in SHIPPED.items()}
    specs = {name: OrthancSpec.plan(cfg["Name"], cfg["DicomAet"]) for name, cfg in shipped.items()}
    processes: dict[str, OrthancProcess] = {}
    rests: dict[str, OrthancRest] = {}
    try:
        for name, spec in specs.items():
            config = machine_config(shipped[name], spec, tmp_path, specs)
            processes[name] = launch_orthanc(spec, tmp_path, {}, extra_config=config, command=orthanc_cmd)
            rests[name] = OrthancRest(spec.url, USER, password, name=name, retry_deadline_s=0)
        for name, process in processes.items():
            wait_ready(process, rests[name])
            # What Orthanc read is the shipped file, not the stack's defaults plus a few keys.
            started_with = json.loads(process.config_path.read_text())
            assert set(started_with) == set(shipped[name]), (
                f"stack defaults leaked in: {set(started_with) - set(shipped[name])}"
            )
            for key in set(shipped[name]) - PER_MACHINE_KEYS:
                assert started_with[key] == shipped[name][key], key
            anonymous = OrthancRest(process.url, name=name, retry_deadline_s=0)
            with pytest.raises(OrthancError) as refused:
                anonymous.system()
            anonymous.close()
            assert refused.value.status == 401  # authentication is on, and the password is the env's
        jobs = shipped["centre"]["ConcurrentJobs"]
        assert f"jobs engine has started with {jobs} threads" in processes["centre"].log_path.read_text()

        batch = tmp_path / "data" / "series.csv"
        loader_env = {
            **os.environ,
            "TCP_NODELAY": "1",
            "PACS_URL": processes["pacs"].url,
            "CENTRE_URL": processes["centre"].url,
            "LOADER_SERIES": "3",
            "LOADER_INSTANCES": "5",
            "LOADER_SEED": "31",
            "BATCH_CSV": str(batch),
            "LOADER_WAIT_S": "10",
        }
        wrong = run_loader({**loader_env, "ORTHANC_PASSWORD": "wrong"}, tmp_path)
        assert wrong.returncode == 1 and "authentication failed" in wrong.stderr, wrong.stderr
        assert not batch.exists()
        loader = run_loader(loader_env, tmp_path)
        assert loader.returncode == 0, loader.stderr
        assert "15 instances of 3 synthetic CT series" in loader.stdout
        uids = [line.split(",")[0] for line in batch.read_text().splitlines()[1:]]
        assert len(uids) == 3 and all(series_count(rests["pacs"], uid) == 5 for uid in uids)

        text = TRANSFER_YAML.read_text()
        assert text.count("http://centre:8042") == 1
        config = tmp_path / "transfer.yaml"
        config.write_text(text.replace("http://centre:8042", processes["centre"].url))
        report = tmp_path / "data" / "report.json"
        res = run_cli(
            "--batch", batch, "--config", config, "--report", report,
            env={"DICOM_TRANSFER_LOCAL_PASSWORD": password},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        result = json.loads(report.read_text())
        assert result["summary"] == {**result["summary"], "total": 3, "complete": 3, "failed": 0, "pending": 0}
        assert [(r["state"], r["expected"], r["received"]) for r in result["series"]] == [("complete", 5, 5)] * 3
        assert all(series_count(rests["centre"], uid) == 5 for uid in uids)

        # Relay mode with the shipped files: through the hospital-side Orthanc, deleted there after.
        for uid in uids:
            found = [f["ID"] for f in rests["centre"].post("/tools/lookup", content=uid) if f["Type"] == "Series"]
            rests["centre"].delete(f"/series/{found[0]}")
        text = RELAY_YAML.read_text()
        relay_config = tmp_path / "relay.yaml"
        for name in ("relay", "centre"):
            text = text.replace(f"http://{name}:8042", processes[name].url)
        relay_config.write_text(text)
        res = run_cli(
            "--batch", batch, "--config", relay_config, "--journal", tmp_path / "relay.journal.sqlite",
            env={"DICOM_TRANSFER_LOCAL_PASSWORD": password, "DICOM_TRANSFER_DESTINATION_PASSWORD": password},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert all(series_count(rests["centre"], uid) == 5 for uid in uids)
        assert rests["relay"].get("/statistics")["CountInstances"] == 0  # forwarded, proven, then deleted
    finally:
        for rest in rests.values():
            rest.close()
        for process in processes.values():
            process.kill()
