"""Deployment files: docker-compose.yml, infra/docker/*, infra/k8s/*.

No Docker engine or cluster exists here, so these files are checked by parsing: the Compose file against
the Compose Specification's JSON schema (from the check-jsonschema package), the built-in Kubernetes kinds against
their strict schemas (kubernetes-validate), and everything sdfleet-specific by structural checks that tie
the files to the code: every `sdfleet ...` command parses with the real CLI parser, every SDFLEET_* variable
is a real setting, the KEDA trigger watches the queue the worker really consumes, and the heartbeat check
the images and probes run is executed against a real Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import redis
import yaml

from sdfleet import keys
from sdfleet.cli import build_parser
from sdfleet.settings import _NOT_SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "infra" / "k8s"
DOCKER_DIR = ROOT / "infra" / "docker"
# The Compose Specification's JSON schema, as shipped inside the check-jsonschema package (a test dependency).
COMPOSE_SCHEMA = Path(__import__("check_jsonschema").__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
# Oldest Kubernetes release the manifests must be valid for.
K8S_VERSION = "1.30.0"
# Roles other parts of the code base add; their checks run once the subcommand exists.
PENDING_SUBCOMMANDS: set[str] = set()


# --- loading ------------------------------------------------------------------------------------------

def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def load_k8s() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document of every manifest, the kustomization excluded."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in load_k8s() if doc.get("kind") == kind]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in k8s_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name} in infra/k8s, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile_instructions(path) if i == "ARG" and "=" in a)


def exec_form(path: Path, instruction: str) -> list[str]:
    found = [a for i, a in dockerfile_instructions(path) if i == instruction]
    assert found, f"{path.name} has no {instruction}"
    args = found[-1]
    if instruction == "HEALTHCHECK":
        args = args[args.index("CMD") + 3:].strip()
    value = json.loads(args)  # exec form: JSON, so signals reach the process and no shell parses it
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("sdfleet.cli.build_parser() has no subcommands")


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def sdfleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if "infra/docker/Dockerfile" in (svc.get("build") or {}).get("dockerfile", "")}


def gpu_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fixed GPU workers (one service per GPU); the autoscaled `fleet` service is checked on its own."""
    return {name: svc for name, svc in sdfleet_services(compose).items()
            if svc["build"]["dockerfile"].endswith("Dockerfile.worker") and "autoscaled" not in svc.get("profiles", [])}


def check_settings_env(env: dict[str, Any], where: str) -> None:
    """Every SDFLEET_* key is a setting and the values build a Settings (as the CLI would at start)."""
    known = {name.upper() for name in Settings.model_fields} | _NOT_SETTINGS
    for key in env:
        if key.startswith("SDFLEET_"):
            assert key[len("SDFLEET_"):] in known, f"{where}: {key} is not a setting (sdfleet/settings.py)"
    usable = {k: str(v) for k, v in env.items()
              if v is not None and (k == "REDIS_URL" or k.startswith("SDFLEET_")) and "REPLACE_ME" not in str(v)}
    Settings.from_env(usable)


# --- every `sdfleet ...` command in the deployment files ----------------------------------------------

def sdfleet_commands() -> list[tuple[str, list[str]]]:
    cmds: list[tuple[str, list[str]]] = []
    for name, svc in sdfleet_services(load_compose()).items():
        if "command" in svc:
            cmd = svc["command"]
            cmds.append((f"docker-compose.yml:{name}", shlex.split(cmd) if isinstance(cmd, str) else list(cmd)))
    for fname, doc in load_k8s():
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        for c in pod_spec(doc)["containers"]:
            if c["image"].startswith("sdfleet-"):
                assert "command" not in c, f"{fname}: {c['name']} overrides the image's entrypoint (tini -- sdfleet)"
                cmds.append((f"{fname}:{c['name']}", list(c.get("args", []))))
    for path in sorted(DOCKER_DIR.glob("Dockerfile.*")):
        cmds.append((f"{path.name}:CMD", exec_form(path, "CMD")))
    return cmds


@pytest.mark.parametrize(("where", "argv"), sdfleet_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_sdfleet_commands_parse(where: str, argv: list[str]) -> None:
    assert argv, f"{where}: no sdfleet command"
    if argv[0] in PENDING_SUBCOMMANDS and argv[0] not in subcommands():
        pytest.skip(f"`sdfleet {argv[0]}` is not in sdfleet.cli.build_parser() yet ({where})")
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # --help exits 0; a usage error exits 2
        assert exc.code == 0, f"{where}: `sdfleet {shlex.join(argv)}` is rejected by the CLI parser"


# --- docker-compose.yml -------------------------------------------------------------------------------

def test_compose_matches_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(errors)


def test_compose_schema_catches_a_misspelt_key() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    bad = load_compose()
    bad["services"]["redis"]["stop_grace_periods"] = "5m"
    assert not jsonschema.validators.validator_for(schema)(schema).is_valid(bad)


def test_compose_has_every_role() -> None:
    services = load_compose()["services"]
    for name in ("redis", "minio", "createbucket", "janitor", "scheduler", "webhook-worker"):
        assert name in services, f"docker-compose.yml has no {name} service"
    assert services["janitor"]["command"] == ["janitor"]
    assert services["scheduler"]["command"][0] == "scheduler"
    assert services["webhook-worker"]["command"][0] == "webhook-worker"
    assert len(gpu_services(load_compose())) >= 2, "one GPU worker service per GPU (gpu0, gpu1)"


def test_compose_redis_persists_and_never_evicts() -> None:
    redis_svc = load_compose()["services"]["redis"]
    cmd = " ".join(redis_svc["command"])
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd, "an evicted queue entry is a lost job"
    assert any(str(v).endswith(":/data") for v in redis_svc["volumes"])


def test_compose_sdfleet_services_are_wired() -> None:
    compose = load_compose()
    services = sdfleet_services(compose)
    bucket = re.search(r"mc mb \S* ?local/([\w.-]+)", " ".join(compose["services"]["createbucket"]["command"]))
    assert bucket, "createbucket does not create a bucket"
    for name, svc in services.items():
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        env = svc["environment"]
        for key in ("REDIS_URL", "SDFLEET_OUT", "SDFLEET_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env.get(key), f"{name}: {key} is not set"
        assert env["REDIS_URL"].startswith("redis://redis:"), f"{name}: REDIS_URL must point at the redis service"
        assert env["SDFLEET_S3_ENDPOINT_URL"].startswith("http://minio:"), name
        assert env["SDFLEET_OUT"].startswith(f"s3://{bucket.group(1)}/"), f"{name}: SDFLEET_OUT is not the bucket createbucket makes"
        check_settings_env(env, f"docker-compose.yml:{name}")
        deps = svc["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["createbucket"]["condition"] == "service_completed_successfully", name
        if "tools" not in svc.get("profiles", []):
            assert svc["restart"] in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"
            assert "stop_grace_period" in svc, f"{name}: no stop_grace_period"


def test_compose_gpu_workers_own_one_gpu_each() -> None:
    compose = load_compose()
    seen_ids: list[str] = []
    for name, svc in gpu_services(compose).items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one GPU per worker"
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert len(dev["device_ids"]) == 1 and "count" not in dev, f"{name}: pin one device id, not a count"
        seen_ids.append(str(dev["device_ids"][0]))
        # Only the reserved GPU is visible inside the container, where it is index 0.
        assert str(svc["environment"]["CUDA_VISIBLE_DEVICES"]) == "0", name
        cmd = svc["command"]
        assert cmd[0] == "worker" and flag(cmd, "--device") == "cuda:0", name
        assert flag(cmd, "--worker-id") == svc["environment"]["WORKER_ID"], (
            f"{name}: WORKER_ID must equal --worker-id, or the healthcheck looks up the wrong heartbeat key")
        assert duration_s(svc["stop_grace_period"]) >= 60, f"{name}: too short to drain a batch on SIGTERM"
        hc = svc["healthcheck"]
        assert "test" not in hc or any("sdfleet:worker:" in str(t) for t in hc["test"]), name
        assert duration_s(hc["start_period"]) >= 300, f"{name}: start_period must cover model load and warm-up"
        assert any(str(v).endswith(":/models:ro") for v in svc["volumes"]), f"{name}: models not mounted read-only"
    assert len(seen_ids) == len(set(seen_ids)), f"two GPU workers share a GPU: {seen_ids}"


def test_compose_infrastructure_has_healthchecks() -> None:
    services = load_compose()["services"]
    for name in ("redis", "minio"):
        assert services[name]["healthcheck"]["test"], name
    assert services["createbucket"]["restart"] == "no", "a one-shot service must not be restarted"


def test_compose_volumes_and_dependencies_are_declared() -> None:
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = str(vol).split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"


# --- infra/docker -------------------------------------------------------------------------------------

DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile.*"))


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.worker", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_exists(path: Path) -> None:
    for instr, args in dockerfile_instructions(path):
        if instr not in ("COPY", "ADD"):
            continue
        parts = [a for a in shlex.split(args) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(args)), "no multi-stage copies expected"
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{path.name}: {instr} {src}: no such file in the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_pinned_torch_as_non_root(path: Path) -> None:
    pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    args = dockerfile_args(path)
    assert pin == f"torch=={args['TORCH_VERSION']}", f"{path.name}: TORCH_VERSION differs from pyproject's {pin}"
    index = args["TORCH_INDEX_URL"]
    if path.name == "Dockerfile.worker":
        assert re.search(r"/whl/cu\d+$", index), "the GPU image must install a CUDA build of torch"
        assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    else:
        assert index.endswith("/whl/cpu"), "the CPU image must install the CPU build of torch"
    runs = " ".join(a for i, a in dockerfile_instructions(path) if i == "RUN")
    assert "--index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}" in runs
    users = [a for i, a in dockerfile_instructions(path) if i == "USER"]
    assert users and users[-1] not in ("0", "root"), f"{path.name}: the image must run as a non-root user"
    assert exec_form(path, "ENTRYPOINT")[-1] == "sdfleet"


def heartbeat_code(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-c"], argv
    compile(argv[2], "<healthcheck>", "exec")
    return argv[2]


def test_worker_healthcheck_matches_the_liveness_probe() -> None:
    docker = heartbeat_code(exec_form(DOCKER_DIR / "Dockerfile.worker", "HEALTHCHECK"))
    assert f"'{keys.worker('')}' + wid" in docker, "the check must read the worker's heartbeat key (sdfleet/keys.py)"
    container = pod_spec(k8s_one("Deployment", "sdfleet-worker"))["containers"][0]
    for probe in ("livenessProbe", "startupProbe"):
        assert heartbeat_code(container[probe]["exec"]["command"]).strip() == docker.strip(), probe


def run_heartbeat_check(code: str, redis_url: str, worker_id: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update({"REDIS_URL": redis_url, "WORKER_ID": worker_id})
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=30).returncode


def test_worker_healthcheck_reads_the_heartbeat(redis_side_url: str) -> None:
    # A key of its own in a database other tests do not flush while this one runs; removed at the end.
    redis_url = redis_side_url
    code = heartbeat_code(exec_form(DOCKER_DIR / "Dockerfile.worker", "HEALTHCHECK"))
    worker_id = f"infra-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    assert run_heartbeat_check(code, redis_url, worker_id) == 1, "no heartbeat must be unhealthy"
    client.hset(keys.worker(worker_id), mapping={"worker_id": worker_id, "state": "busy"})
    assert run_heartbeat_check(code, redis_url, worker_id) == 0, "a live heartbeat must be healthy"
    client.hset(keys.worker(worker_id), "state", "stalled")  # a hung engine call (the worker then exits 3)
    assert run_heartbeat_check(code, redis_url, worker_id) == 1, "a stalled worker must be unhealthy"
    client.delete(keys.worker(worker_id))
    with socket.socket() as s:  # a port nothing listens on: Redis down is not the worker's fault
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    assert run_heartbeat_check(code, dead, worker_id) == 0


def test_dockerignore_keeps_the_package_and_drops_the_rest() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:  # last matching pattern wins, as in Docker
        result = False
        parts = PurePosixPath(path).parts
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch(p, pat) or fnmatch(p, pat.replace("**/", "")) for p in prefixes):
                result = not neg
        return result

    includes = re.search(r"^include = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    for pkg in {i.strip(' "*') for i in includes.split(",")}:
        if (ROOT / pkg).is_dir():
            assert not ignored(f"{pkg}/__init__.py"), f".dockerignore drops the package {pkg}"
    assert not ignored("pyproject.toml")
    for junk in (".venv/bin/python", "outputs/x.png", ".git/HEAD", "infra/k8s/secrets.env", "sdfleet/__pycache__/x.pyc"):
        assert ignored(junk), f".dockerignore lets {junk} into the build context"


# --- infra/k8s ----------------------------------------------------------------------------------------

def test_k8s_documents_have_identity() -> None:
    docs = load_k8s()
    assert docs
    for fname, doc in docs:
        for field in ("apiVersion", "kind"):
            assert doc.get(field), f"{fname}: a document has no {field}"
        assert doc.get("metadata", {}).get("name"), f"{fname}: {doc['kind']} has no metadata.name"
    kinds = {doc["kind"] for _, doc in docs}
    assert kinds >= {"Namespace", "ConfigMap", "Deployment", "ScaledObject", "PodDisruptionBudget"}


def test_k8s_builtin_kinds_match_the_strict_schemas() -> None:
    import kubernetes_validate  # test extra; validates built-in kinds, rejecting unknown (misspelt) fields

    for fname, doc in load_k8s():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except jsonschema.ValidationError as exc:  # what kubernetes_validate raises, and its base class
            where = f"{fname}: {doc['kind']} {doc['metadata']['name']}"
            pytest.fail(f"{where}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}", pytrace=False)
    bad = {**k8s_one("Deployment", "sdfleet-worker")}
    bad["spec"] = {**bad["spec"], "replicaz": 2}
    with pytest.raises(jsonschema.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"kustomization.yaml resources differ from the files: {listed ^ on_disk}"
    for gen in kust.get("secretGenerator", []):
        for env_file in gen.get("envs", []):
            example = K8S_DIR / f"{env_file}.example"
            assert example.is_file(), f"{env_file} is generated from an operator's file; ship {example.name}"


def test_k8s_workloads_have_resources_and_wiring() -> None:
    config_maps = {d["metadata"]["name"] for d in k8s_kind("ConfigMap")}
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    secrets = {g["name"] for g in kust.get("secretGenerator", [])} | {d["metadata"]["name"] for d in k8s_kind("Secret")}
    for doc in k8s_kind("Deployment") + k8s_kind("StatefulSet"):
        name = doc["metadata"]["name"]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        for k, v in doc["spec"]["selector"]["matchLabels"].items():
            assert labels.get(k) == v, f"{name}: the selector does not match the pod template"
        for c in pod_spec(doc)["containers"]:
            res = c.get("resources", {})
            assert res.get("requests", {}).get("cpu") and res["requests"].get("memory"), f"{name}/{c['name']}: requests"
            assert res.get("limits", {}).get("memory"), f"{name}/{c['name']}: no memory limit"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in config_maps, f"{name}: unknown ConfigMap"
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets, f"{name}: unknown Secret"
        if doc["kind"] == "Deployment":
            assert pod_spec(doc)["securityContext"]["runAsNonRoot"] is True, name


def test_k8s_settings_are_real_settings() -> None:
    (cm,) = [d for d in k8s_kind("ConfigMap") if d["metadata"]["name"] == "sdfleet-settings"]
    check_settings_env(cm["data"], "config.yaml")
    example = (K8S_DIR / "secrets.env.example").read_text()
    secret_env = dict(ln.split("=", 1) for ln in example.splitlines() if ln and not ln.startswith("#"))
    assert "SDFLEET_WEBHOOK_SECRET" in secret_env, "the webhook signing secret belongs in the Secret"
    assert "SDFLEET_WEBHOOK_SECRET" not in cm["data"]
    check_settings_env(secret_env, "secrets.env.example")


def test_k8s_worker_owns_one_gpu_and_drains() -> None:
    dep = k8s_one("Deployment", "sdfleet-worker")
    spec = pod_spec(dep)
    (c,) = spec["containers"]
    for section in ("requests", "limits"):
        assert str(c["resources"][section].get("nvidia.com/gpu")) == "1", f"one GPU per pod ({section})"
    assert "replicas" not in dep["spec"], "KEDA owns the replica count: `replicas` here resets it on every apply"
    # The grace period covers the longest batch a worker may hold: --max-batch jobs at the largest shape a
    # job may ask for, priced by the scheduler's own model (x2: attention grows faster than the pixels).
    from scheduler.policy import default_s_per_image, price
    from sdfleet.jobs import MAX_SIDE, MAX_STEPS

    args = c["args"]
    model = PurePosixPath(flag(args, "--model")).name
    longest = int(flag(args, "--max-batch")) * price(keys.bucket_of(MAX_SIDE, MAX_SIDE, MAX_STEPS), {},
                                                     default_s_per_image(model)) * 2
    env = {e["name"]: e.get("value") for e in c["env"]}
    drain = float(env.get("SDFLEET_DRAIN_TIMEOUT_S") or Settings().drain_timeout_s)
    assert drain >= longest, f"SDFLEET_DRAIN_TIMEOUT_S {drain} is shorter than the longest batch (~{longest:.0f} s)"
    assert spec["terminationGracePeriodSeconds"] >= drain + 30, "the pod is killed before the worker's drain ends"
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[:2] == ["/bin/sh", "-c"] and "kill -TERM 1" in pre[2] and "kill -0 1" in pre[2], (
        "preStop starts the drain (SIGTERM to tini, which forwards it) and waits for the worker to exit")
    assert flag(args, "--metrics-port") == str(c["ports"][0]["containerPort"])
    assert spec.get("nodeSelector") and any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    args = c["args"]
    assert args[0] == "worker" and flag(args, "--device") == "cuda:0"
    assert flag(args, "--worker-id") == "$(WORKER_ID)"
    (wid,) = [e for e in c["env"] if e["name"] == "WORKER_ID"]
    assert wid["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert spec["containers"][0]["startupProbe"]["failureThreshold"] * spec["containers"][0]["startupProbe"][
        "periodSeconds"] >= 300, "the startup probe must allow for model load and warm-up"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod needs a spare GPU"


def test_keda_scales_the_worker_on_the_schedulers_desired_count() -> None:
    (so,) = k8s_kind("ScaledObject")
    dep = k8s_one("Deployment", "sdfleet-worker")
    sched = k8s_one("Deployment", "sdfleet-scheduler")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == dep["metadata"]["name"] and target.get("kind", "Deployment") == "Deployment"
    worker_args = pod_spec(dep)["containers"][0]["args"]
    pool = PurePosixPath(flag(worker_args, "--model") or "tiny").name
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger.get("metricType", "AverageValue") == "AverageValue"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    sched_args = pod_spec(sched)["containers"][0]["args"]
    (svc,) = [d for d in k8s_kind("Service") if d["metadata"]["name"] == "sdfleet-scheduler"]
    namespace = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["namespace"]
    port = svc["spec"]["ports"][0]["port"]
    assert meta["url"] == f"http://sdfleet-scheduler.{namespace}.svc.cluster.local:{port}/scale/{pool}"
    assert flag(sched_args, "--metrics-port") == str(port)
    assert pool in [sched_args[i + 1] for i, a in enumerate(sched_args) if a == "--model"], (
        f"the scheduler does not manage the worker's pool {pool}")
    assert meta["valueLocation"] == "desired" and meta["targetValue"] == "1", "replicas = the desired count"
    assert meta["format"] == "json" and meta["activationTargetValue"] == "0", "active on the first wanted worker"
    assert spec["minReplicaCount"] == 0, "scale to zero is allowed"
    assert spec["maxReplicaCount"] == int(flag(sched_args, "--max-workers")), "the scheduler and KEDA agree on max"
    assert flag(sched_args, "--max-batch") == flag(worker_args, "--max-batch")
    assert flag(sched_args, "--driver") == "none", "on Kubernetes KEDA acts; the scheduler only decides"
    assert sched["spec"]["replicas"] == 1 and sched["spec"]["strategy"]["type"] == "Recreate"
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 30, "one odd poll must not shrink the pool"


def test_the_scheduler_serves_what_keda_reads(env: dict[str, str], r: redis.Redis, tmp_path: Path) -> None:
    """The scheduler started with the manifest's own arguments answers the trigger's URL with a count."""
    from sdfleet.redisconn import free_port

    (so,) = k8s_kind("ScaledObject")
    meta = so["spec"]["triggers"][0]["metadata"]
    args = list(pod_spec(k8s_one("Deployment", "sdfleet-scheduler"))["containers"][0]["args"])
    port = free_port()
    args[args.index("--metrics-port") + 1] = str(port)
    args[args.index("--interval") + 1] = "0.2"
    pool = meta["url"].rsplit("/", 1)[1]
    r.rpush(keys.queue_for_model(pool), "not a celery message")  # one unreadable message still counts as work
    log = tmp_path / "scheduler.log"
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet.cli", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        doc = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/scale/{pool}", timeout=5) as resp:
                    doc = json.loads(resp.read())
                break
            except OSError:
                proc.poll()
                assert proc.returncode is None, log.read_text()
                time.sleep(0.1)
        assert doc is not None, log.read_text()
        value = doc
        for part in meta["valueLocation"].split("."):
            value = value[part]
        assert isinstance(value, int) and value == 1, doc
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_pdb_covers_the_workers() -> None:
    (pdb,) = k8s_kind("PodDisruptionBudget")
    dep = k8s_one("Deployment", "sdfleet-worker")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert pdb["spec"].get("maxUnavailable") == 1


def test_one_janitor_per_fleet() -> None:
    dep = k8s_one("Deployment", "sdfleet-janitor")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod_spec(dep)["containers"][0]["args"][0] == "janitor"


def test_compose_autoscaled_fleet_runs_the_local_driver() -> None:
    compose = load_compose()
    fleet = compose["services"]["fleet"]
    assert fleet["build"]["dockerfile"].endswith("Dockerfile.worker") and fleet["profiles"] == ["autoscaled"]
    cmd = fleet["command"]
    assert cmd[0] == "scheduler" and flag(cmd, "--driver") == "local"
    build_parser().parse_args(cmd)
    # The driver pins one worker per GPU itself: the container gets every GPU and no CUDA_VISIBLE_DEVICES.
    (dev,) = fleet["deploy"]["resources"]["reservations"]["devices"]
    assert dev["count"] == "all" and "CUDA_VISIBLE_DEVICES" not in fleet["environment"]
    assert duration_s(fleet["stop_grace_period"]) >= 300, "stopping the fleet drains every worker's batch"
    assert "sdfleet:worker:" not in json.dumps(fleet["healthcheck"]["test"]), "the scheduler has no heartbeat key"


# --- infra/monitoring ---------------------------------------------------------------------------------

MONITORING = ROOT / "infra" / "monitoring"
REQUIRED_ALERTS = {"SdfleetBacklogGrowingWithoutWorkers", "SdfleetWorkerStalled", "SdfleetWebhookDeadLettersRising",
                   "SdfleetGpuIdleWithQueuedWork"}
ALERT_SCHEMA = {
    "type": "object", "required": ["groups"], "additionalProperties": False,
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "interval": {"type": "string"}, "rules": {"type": "array", "items": {
            "type": "object", "required": ["alert", "expr", "for", "labels", "annotations"], "additionalProperties": False,
            "properties": {
                "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"}, "expr": {"type": "string"},
                "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d))+$"},
                "labels": {"type": "object", "required": ["severity"],
                           "properties": {"severity": {"enum": ["critical", "warning", "info"]}}},
                "annotations": {"type": "object", "required": ["summary", "description"]}}}}}}}},
}
DASHBOARD_SCHEMA = {
    "type": "object", "required": ["title", "uid", "schemaVersion", "panels", "templating"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"}, "schemaVersion": {"type": "integer", "minimum": 30},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer"}, "type": {"enum": ["timeseries", "stat", "gauge", "table", "heatmap", "bargauge"]},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "w": {"type": "integer", "minimum": 1, "maximum": 24}, "x": {"type": "integer", "minimum": 0, "maximum": 23},
                    "h": {"type": "integer", "minimum": 1}, "y": {"type": "integer", "minimum": 0}}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["expr", "refId"],
                    "properties": {"expr": {"type": "string", "minLength": 1}, "refId": {"type": "string"}}}}}}},
    },
}


def exported_metric_names() -> set[str]:
    """Every sample name the roles export (sdfleet/metrics.py), parsed from their own /metrics text."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from sdfleet.metrics import SchedulerMetrics, WebhookMetrics, WorkerMetrics

    class Nvml:  # no GPU here: fixed readings so the GPU families are exported too
        NVML_TEMPERATURE_GPU = 0
        nvmlDeviceGetHandleByUUID = staticmethod(lambda u: u)  # noqa: N815
        nvmlDeviceGetUtilizationRates = staticmethod(lambda h: SimpleNamespace(gpu=1))  # noqa: N815
        nvmlDeviceGetMemoryInfo = staticmethod(lambda h: SimpleNamespace(used=1, total=2))  # noqa: N815
        nvmlDeviceGetTemperature = staticmethod(lambda h, s: 1)  # noqa: N815
        nvmlDeviceGetPowerUsage = staticmethod(lambda h: 1)  # noqa: N815

    sched = SchedulerMetrics()
    sched.observe("p", queued=1, in_flight=1, backlog_s=1, desired=1, actual=1, busy=1, stalled=0)
    sched.scale_events.labels("p", "up").inc()
    sched.restarts.labels("p").inc()
    names: set[str] = set()
    for text in (WorkerMetrics("w", "p", "GPU-1", nvml=Nvml()).render(), WebhookMetrics(lambda: 0).render(),
                 sched.render()):
        for fam in text_string_to_metric_families(text):
            names |= {s.name for s in fam.samples}
    return names


def referenced_metrics(text: str) -> set[str]:
    # (sdfleet_worker_state is also the label of that Enum metric: a name either way.)
    return set(re.findall(r"\b(sdfleet_[a-z_]+)\b", text))


def test_alert_rules_cover_the_failures_and_use_real_metrics() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(ALERT_SCHEMA).iter_errors(rules)]
    assert not errors, errors
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert REQUIRED_ALERTS <= set(alerts), f"missing alerts: {REQUIRED_ALERTS - set(alerts)}"
    exported = exported_metric_names()
    for name, rule in alerts.items():
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), name
        unknown = referenced_metrics(expr) - exported
        assert not unknown, f"{name} reads metrics no role exports: {unknown}"


def test_alert_rules_pass_promtool() -> None:
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus); the schema test above still ran")
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        res = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}{res.stderr}"


def test_grafana_dashboard_is_valid_and_uses_real_metrics() -> None:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(DASHBOARD_SCHEMA).iter_errors(dash)]
    assert not errors, errors
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
    exported = exported_metric_names()
    used = set()
    for p in panels:
        for t in p["targets"]:
            used |= referenced_metrics(t["expr"])
    assert not used - exported, f"the dashboard reads metrics no role exports: {used - exported}"
    for needed in ("sdfleet_pool_backlog_gpu_seconds", "sdfleet_pool_desired_workers", "sdfleet_images_per_second",
                   "sdfleet_gpu_utilization_ratio", "sdfleet_webhook_dead_letters", "sdfleet_jobs_total"):
        assert needed in used, f"the dashboard has no panel for {needed}"
