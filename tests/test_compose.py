"""docker-compose.yml and the Dockerfile: the production stack says what README promises, and the two agree
with each other and with the `m3q` CLI (parsed and checked here; Docker itself does not run in CI)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tomllib
import yaml

from producer.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
WORKERS = ("worker-gpu0", "worker-gpu1", "worker-cpu")
IMAGE_SERVICES = (*WORKERS, "gateway")
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


@pytest.mark.parametrize("name", ["redis", "etcd", "minio", "milvus", *IMAGE_SERVICES])
def test_services_have_healthchecks(services, name):
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
        assert command_text(services[name]) == "worker --device cuda"
        assert services[name]["image"].endswith(":cuda") and services[name]["build"]["args"]["TORCH"] == "cuda"
    assert sorted(seen) == ["0", "1"]


def test_cpu_worker(services):
    cpu = services["worker-cpu"]
    assert not gpu_devices(cpu)
    assert command_text(cpu) == "worker --device cpu --dtype bfloat16"
    assert cpu["image"].endswith(":cpu") and cpu["build"]["args"]["TORCH"] == "cpu"


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
    assert worker["stop_grace_period"] == "120s"  # Celery's warm shutdown finishes the batch in hand
    for dependency in ("redis", "milvus"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"


def test_gateway_serves_http_with_a_healthcheck_and_no_model(services):
    gateway = services["gateway"]
    assert command_text(gateway) == "serve --host 0.0.0.0 --port 8080"
    assert gateway["image"].endswith(":cpu")  # the CUDA build would only make it bigger: it loads no model
    health = " ".join(gateway["healthcheck"]["test"])
    assert gateway["healthcheck"]["test"][0] == "CMD" and "http://127.0.0.1:8080/health" in health
    assert gateway["healthcheck"]["start_period"]  # /health is 503 until a worker has loaded the model
    env = gateway["environment"]
    assert env["M3Q_BROKER_URL"] == services["worker-cpu"]["environment"]["M3Q_BROKER_URL"]
    assert env["M3Q_MILVUS_URI"] == "http://milvus:19530" and env["M3Q_API_KEYS"].startswith("${M3Q_API_KEYS")
    assert gateway["ports"] == ["${M3Q_BIND:-127.0.0.1}:8080:8080"]
    assert gateway["stop_grace_period"] == "60s"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert not gpu_devices(gateway) and not any("huggingface" in v for v in gateway.get("volumes", []))


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


# ---- the image: docker-compose.yml and the Dockerfile agree --------------------------------------------

def dockerfile_stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's (INSTRUCTION, arguments), by stage name; continuation lines joined, comments dropped
    (Docker drops comment lines inside a continuation too). Instructions before the first FROM go under ""."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current, pending = "", ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else str(len(stages))
            stages[current] = []
        stages[current].append((word.upper(), rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, list[tuple[str, str]]]:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def runtime(stages) -> list[tuple[str, str]]:
    """The last stage: what the image is."""
    return list(stages.values())[-1]


def args_of(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [rest for word, rest in stage if word == instruction]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for rest in args_of(stage, "ENV") for item in shlex.split(rest))


def exec_form(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    (last,) = args_of(stage, instruction)[-1:]
    return json.loads(last)


def image_command(service: dict, runtime: list[tuple[str, str]]) -> list[str]:
    """What a container of the service runs: the image's ENTRYPOINT, then compose's command."""
    return exec_form(runtime, "ENTRYPOINT") + service["command"]


def run_m3q(*argv: str) -> subprocess.CompletedProcess:
    """The installed `m3q` console script, the image's ENTRYPOINT."""
    return subprocess.run([str(Path(sys.executable).with_name("m3q")), *argv], capture_output=True, text=True,
                          timeout=60)


def test_the_image_runs_m3q_with_a_default_command_the_cli_accepts(runtime):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    entrypoint = exec_form(runtime, "ENTRYPOINT")
    assert entrypoint == ["m3q"] and "m3q" in pyproject["project"]["scripts"]
    default = exec_form(runtime, "CMD")
    done = run_m3q(*default)
    assert done.returncode == 0 and "usage: m3q" in done.stdout, done.stderr


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_service_commands_are_m3q_commands_the_cli_accepts(services, runtime, name):
    entrypoint, *argv = image_command(services[name], runtime)
    assert entrypoint == "m3q" and not {"sh", "pip", "-c"} & set(argv), "a service runs m3q itself, nothing else"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{name}: `m3q {' '.join(argv)}` is not a command m3q accepts")
    assert args.command == ("serve" if name == "gateway" else "worker")
    # The real console script, as the image runs it: the command and its flags, then --help (no Redis needed).
    done = run_m3q(*argv, "--help")
    assert done.returncode == 0 and f"usage: m3q {args.command}" in done.stdout, done.stderr


def test_worker_devices_and_dtypes_are_ones_the_worker_resolves(services, runtime):
    from worker.device import dtype_name, resolve_device, resolve_dtype

    for name in WORKERS:
        args = build_parser().parse_args(image_command(services[name], runtime)[1:])
        assert args.device == ("cpu" if name == "worker-cpu" else "cuda")
        if args.device == "cpu":  # CUDA cannot be resolved on a machine without a GPU
            assert dtype_name(resolve_dtype(args.dtype, resolve_device(args.device))) == args.dtype == "bfloat16"


def container_ports(service: dict) -> set[int]:
    return {int(str(port).rsplit(":", 1)[-1]) for port in service.get("ports", [])}


def healthcheck_port(service: dict) -> int:
    (url,) = re.findall(r"http://[^'\" ]+", " ".join(service["healthcheck"]["test"]))
    return urlparse(url).port


def test_ports_match_the_images_expose_and_the_cli(services, runtime):
    exposed = {int(port) for rest in args_of(runtime, "EXPOSE") for port in rest.split()}
    serve = build_parser().parse_args(["serve"])
    gateway = build_parser().parse_args(image_command(services["gateway"], runtime)[1:])
    assert gateway.port == serve.port == healthcheck_port(services["gateway"]) and gateway.host == "0.0.0.0"
    assert container_ports(services["gateway"]) == {gateway.port}
    metrics = int(env_of(runtime)["M3Q_METRICS_PORT"])
    for name in WORKERS:
        worker = services[name]
        assert int(worker["environment"]["M3Q_METRICS_PORT"]) == metrics == healthcheck_port(worker)
        assert container_ports(worker) == {metrics} and {int(p) for p in worker["expose"]} == {metrics}
    assert exposed == {gateway.port, metrics}


def test_the_hf_cache_volume_is_mounted_at_the_images_hf_home(compose, services, runtime):
    hf_home = env_of(runtime)["HF_HOME"]
    volumes = [v for rest in args_of(runtime, "VOLUME") for v in json.loads(rest)]
    assert volumes == [hf_home]
    assert "hf-cache" in compose["volumes"]
    for name in WORKERS:
        assert services[name]["volumes"] == [f"hf-cache:{hf_home}"], name
        assert services[name]["environment"]["HF_HOME"] == hf_home


def test_the_image_runs_as_a_user_who_owns_the_hf_cache(services, runtime):
    user = args_of(runtime, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric id, so Kubernetes' runAsNonRoot can check it"
    runs = " ".join(args_of(runtime, "RUN"))
    made = re.search(rf"useradd [^&]*--uid {uid} [^&]*?(\w+)\s+&&", runs)
    assert made, f"the image makes the user {uid}"
    name = made.group(1)
    hf_home = env_of(runtime)["HF_HOME"]
    assert re.search(rf"install -d -o {name} -g {name} {re.escape(hf_home)}\b", runs)
    words = [word for word, _ in runtime]
    assert words.index("RUN") < words.index("VOLUME")  # Docker copies the folder's owner into a new volume
    for service in IMAGE_SERVICES:
        assert services[service].get("user") in (None, user), f"{service} overrides the image's user"


@pytest.mark.parametrize("name", IMAGE_SERVICES)
def test_services_run_the_built_image_without_pip_or_sources(services, name):
    service = services[name]
    assert service["build"]["context"] == "."
    assert service["image"] == "${M3Q_IMAGE:-m3-queue}:" + service["build"]["args"]["TORCH"]
    assert "pip" not in command_text(service)
    assert not any(k.startswith("PIP_") for k in service["environment"])
    for volume in service.get("volumes", []):
        assert not volume.startswith((".", "/", "~")), f"{name} mounts {volume} from the host"


# ---- the Dockerfile's own steps ------------------------------------------------------------------------

def torch_step(stages) -> str:
    """The builder's RUN that installs torch, without its --mount flags."""
    (step,) = [rest for rest in args_of(stages["builder"], "RUN") if "$TORCH" in rest]
    return re.sub(r"^(--\S+\s+)+", "", step)


def run_torch_step(stages, torch: str) -> subprocess.CompletedProcess:
    """The step as `sh` runs it in the image, with `pip` replaced by a function that prints its arguments."""
    script = 'pip() { echo "pip $*"; }\n' + torch_step(stages)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={"TORCH": torch}, timeout=30)


def test_the_torch_build_argument_picks_the_wheel(stages, services):
    declared = {rest.partition("=")[0]: rest.partition("=")[2] for rest in args_of(stages["builder"], "ARG")}
    assert declared["TORCH"] == "cpu"
    cpu, cuda, cu126 = (run_torch_step(stages, torch) for torch in ("cpu", "cuda", "cu126"))
    assert cpu.returncode == 0 and cpu.stdout.split() == [
        "pip", "install", "--no-deps", "--index-url", "https://download.pytorch.org/whl/cpu",
        "-c", ".ci/constraints.txt", "torch"]
    assert cuda.returncode == 0 and cuda.stdout.split() == ["pip", "install", "-c", ".ci/constraints.txt", "torch"]
    assert cu126.returncode == 0 and "https://download.pytorch.org/whl/cu126" in cu126.stdout
    wrong = run_torch_step(stages, "rocm")
    assert wrong.returncode == 2 and not wrong.stdout and "TORCH=rocm" in wrong.stderr
    for name in IMAGE_SERVICES:
        build_args = services[name]["build"]["args"]
        assert set(build_args) <= set(declared), f"{name} passes a build argument the Dockerfile lacks"
        assert run_torch_step(stages, build_args["TORCH"]).returncode == 0


def test_the_image_installs_extras_that_exist_at_ci_versions(stages):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installs = [rest for rest in args_of(stages["builder"], "RUN") if "pip install" in rest]
    assert installs and all("-c .ci/constraints.txt" in rest for rest in installs)
    (extras,) = re.findall(r"\"\.\[([^\]]+)\]\"", " ".join(installs))
    extras = extras.split(",")
    assert {"worker", "http"} <= set(extras) <= set(pyproject["project"]["optional-dependencies"])
    assert re.search(r"^torch==", (ROOT / ".ci/constraints.txt").read_text(), re.M)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides."""
    ignored = False
    for pattern in patterns:
        glob = pattern.removeprefix("!").rstrip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex).replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not pattern.startswith("!")
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_more(stages):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [source for rest in args_of(stages["builder"], "COPY") for source in shlex.split(rest)[:-1]]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]:
        assert package.split(".")[0] in copied, f"{package} is not copied into the builder"
    assert pyproject["project"]["readme"] in copied
    for path in [*copied, "producer/cli.py", "worker/model.py", "producer/data/sample_corpus.jsonl"]:
        assert (ROOT / path).exists() and not dockerignored(path, patterns), path
    for path in (".venv/bin/python", ".venv-tf5/bin/python", ".git/HEAD", "tests/data/x", "site/index.html",
                 "bench/load.py", "docs/deployment.md", "producer/__pycache__/cli.cpython-311.pyc",
                 "m3_queue.egg-info/PKG-INFO", ".ci/run"):
        assert dockerignored(path, patterns), path
