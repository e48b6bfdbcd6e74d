"""docker-compose.yml: the production stack says what README promises (parsed, not run)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
WORKERS = ("worker-gpu0", "worker-gpu1", "worker-cpu")
SECRET_KEYS = re.compile(r"PASSWORD|SECRET|TOKEN|_AUTH$|ACCESS_KEY|API_KEYS")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_services_present(services):
    assert {"redis", "etcd", "minio", "milvus", *WORKERS, "gateway", "flower"} <= set(services)
    assert services["flower"]["profiles"] == ["monitoring"]


def test_redis_is_durable_and_password_protected(services):
    command = command_text(services["redis"])
    assert re.search(r"--appendonly yes\b", command)
    assert re.search(r"--maxmemory-policy noeviction\b", command)
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD:\?", command)


@pytest.mark.parametrize("name", ["redis", "etcd", "minio", "milvus"])
def test_infrastructure_has_healthchecks(services, name):
    test = services[name]["healthcheck"]["test"]
    assert test and test[0] in ("CMD", "CMD-SHELL")


def test_milvus_standalone(services):
    milvus = services["milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:")
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
    assert milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    assert set(milvus["depends_on"]) == {"etcd", "minio"}


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_one_gpu_per_gpu_worker(services):
    seen = []
    for name in ("worker-gpu0", "worker-gpu1"):
        (device,) = gpu_devices(services[name])
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        seen += device["device_ids"]
        assert "m3q worker --device cuda" in command_text(services[name])
    assert sorted(seen) == ["0", "1"]


def test_cpu_worker(services):
    cpu = services["worker-cpu"]
    assert not gpu_devices(cpu)
    assert "m3q worker --device cpu --dtype bfloat16" in command_text(cpu)


@pytest.mark.parametrize("name", WORKERS)
def test_worker_settings(services, name):
    worker = services[name]
    env = worker["environment"]
    assert (env["M3Q_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
            and env["M3Q_BROKER_URL"].endswith("@redis:6379/0"))
    assert env["M3Q_MILVUS_URI"] == "http://milvus:19530"
    assert env["M3Q_MILVUS_TOKEN"].startswith("${")
    assert "M3Q_MODEL" in env and env["M3Q_METRICS_PORT"] == "9400"
    assert "9400" in [str(p) for p in worker["expose"]]
    assert any(v.endswith(":/root/.cache/huggingface") for v in worker["volumes"])
    assert "pip install" in command_text(worker) and "/app" in command_text(worker)
    for dependency in ("redis", "milvus"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"


def test_gateway_serves_http_with_a_healthcheck_and_no_model(services):
    gateway = services["gateway"]
    command = command_text(gateway)
    assert "pip install" in command and "[http]'" in command and "[worker]" not in command  # no torch
    assert "exec m3q serve --host 0.0.0.0 --port 8080" in command
    health = " ".join(gateway["healthcheck"]["test"])
    assert gateway["healthcheck"]["test"][0] == "CMD" and "http://127.0.0.1:8080/health" in health
    assert gateway["healthcheck"]["start_period"]  # the first start installs the package
    env = gateway["environment"]
    assert env["M3Q_BROKER_URL"] == services["worker-cpu"]["environment"]["M3Q_BROKER_URL"]
    assert env["M3Q_MILVUS_URI"] == "http://milvus:19530" and env["M3Q_API_KEYS"].startswith("${M3Q_API_KEYS")
    assert gateway["ports"] == ["${M3Q_BIND:-127.0.0.1}:8080:8080"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert not gpu_devices(gateway) and not any("huggingface" in v for v in gateway["volumes"])


def env_items(compose: dict):
    """(service, key, value) of every environment entry."""
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        pairs = env.items() if isinstance(env, dict) else (item.partition("=")[::2] for item in env)
        for key, value in pairs:
            yield name, key, str(value)


def test_no_hard_coded_secrets(compose):
    variable = re.compile(r"^\$\{[A-Z0-9_]+(:[-?][^}]*)?\}$")
    secrets = [(n, k, v) for n, k, v in env_items(compose) if SECRET_KEYS.search(k) or k.startswith("MINIO_ROOT")]
    assert len(secrets) >= 6, "the scan should see the password settings"
    for name, key, value in secrets:
        assert variable.match(value), f"{name}: {key} looks hard-coded: {value!r}"
    redis = compose["services"]["redis"]["command"]
    assert variable.match(redis[redis.index("--requirepass") + 1])
    urls = [v for _, _, v in env_items(compose) if "://" in v]
    for password in re.findall(r"redis://:([^@]*)@", " ".join(urls)):  # a password inside a URL
        assert variable.match(password), password
    assert "minioadmin" not in COMPOSE.read_text()


def test_ports_are_not_published_on_all_interfaces(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("${M3Q_BIND:-127.0.0.1}:"), f"{name} publishes {port}"
