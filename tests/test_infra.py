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
    return {name: svc for name, svc in sdfleet_services(compose).items()
            if svc["build"]["dockerfile"].endswith("Dockerfile.worker")}


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
    for name in ("redis", "minio", "createbucket", "scheduler", "webhook-worker"):
        assert name in services, f"docker-compose.yml has no {name} service"
    assert services["scheduler"]["command"] == ["janitor"]
    assert services["webhook-worker"]["command"] == ["webhook-worker"]
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


def test_worker_healthcheck_reads_the_heartbeat(redis_base_url: str) -> None:
    # A key of its own in a database other tests do not flush while this one runs; removed at the end.
    redis_url = redis_base_url.rsplit("/", 1)[0] + "/13"
    code = heartbeat_code(exec_form(DOCKER_DIR / "Dockerfile.worker", "HEALTHCHECK"))
    worker_id = f"infra-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    assert run_heartbeat_check(code, redis_url, worker_id) == 1, "no heartbeat must be unhealthy"
    client.hset(keys.worker(worker_id), mapping={"worker_id": worker_id})
    assert run_heartbeat_check(code, redis_url, worker_id) == 0, "a live heartbeat must be healthy"
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
    assert spec["terminationGracePeriodSeconds"] >= 60, "too short to drain a batch on SIGTERM"
    assert "preStop" not in c.get("lifecycle", {}), "SIGTERM drains; a preStop sleep only delays it"
    assert spec.get("nodeSelector") and any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    args = c["args"]
    assert args[0] == "worker" and flag(args, "--device") == "cuda:0"
    assert flag(args, "--worker-id") == "$(WORKER_ID)"
    (wid,) = [e for e in c["env"] if e["name"] == "WORKER_ID"]
    assert wid["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert spec["containers"][0]["startupProbe"]["failureThreshold"] * spec["containers"][0]["startupProbe"][
        "periodSeconds"] >= 300, "the startup probe must allow for model load and warm-up"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge pod needs a spare GPU"


def test_keda_scales_the_worker_on_its_queue() -> None:
    (so,) = k8s_kind("ScaledObject")
    dep = k8s_one("Deployment", "sdfleet-worker")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target["name"] == dep["metadata"]["name"] and target.get("kind", "Deployment") == "Deployment"
    args = pod_spec(dep)["containers"][0]["args"]
    queue = keys.queue_for_model(PurePosixPath(flag(args, "--model") or "tiny").name)
    triggers = [t for t in spec["triggers"] if t["type"] == "redis"]
    assert triggers, "no redis trigger"
    meta = triggers[0]["metadata"]
    assert meta["listName"] == queue, f"the trigger watches {meta['listName']}, the worker consumes {queue}"
    max_batch = int(flag(args, "--max-batch") or 4)
    assert 2 * max_batch <= int(meta["listLength"]) <= 8 * max_batch, "listLength: about 4 x --max-batch per worker"
    assert isinstance(meta["listLength"], str), "KEDA trigger metadata values are strings"
    (redis_svc,) = [d for d in k8s_kind("Service") if d["metadata"]["name"] == "redis"]
    namespace = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["namespace"]
    assert meta["address"] == f"{redis_svc['metadata']['name']}.{namespace}.svc.cluster.local:6379"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60, "scale-down must not chase every dip in the backlog"


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
