"""Static checks of the deployment files: docker-compose.yml, .env.example, deploy/docker/Dockerfile.*,
deploy/k8s/ (kustomize base and overlays).  Nothing here builds an image or talks to a cluster.

Kubernetes objects are validated offline against the schemas the `kubernetes-validate` package ships
(strict: unknown fields fail), KEDA's and kustomize's against the schemas in tests/deploy/schemas/,
the Compose file against the compose spec that `check-jsonschema` vendors.  The overlays are rendered
by a small strategic-merge renderer here; where `kubectl` (with its built-in kustomize) is installed,
they are also rendered by kustomize itself and that output validated too.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.cli import build_parser
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKER = REPO / "deploy" / "docker"
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests are meant for
CELERY_ARCHIVE_QUEUE = "archive"
OUR_IMAGES = ("lvpnet/archive-", "${LVPNET_REGISTRY")
SECRET_WORDS = ("PASSWORD", "SECRET", "ACCESS_KEY", "DATABASE_URL", "BROKER_URL")


# ------------------------------------------------------------------------------------ helpers


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as compose and kustomize read them."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}:{number}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path}:{number}: {key} set twice"
        values[key] = value
    return values


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return schema


def _validate(instance: Any, schema: dict[str, Any], what: str) -> None:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{what}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def _settings_fields() -> set[str]:
    return {f"ARCHIVE_{name.upper()}" for name in Settings.model_fields}


def _read_directly() -> set[str]:
    """ARCHIVE_* variables the code reads from os.environ itself rather than through Settings."""
    names: set[str] = set()
    for package in ("service", "worker", "lvpnet"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(re.findall(r"""["'](ARCHIVE_[A-Z0-9_]+)["']""", path.read_text()))
    return names


def _cli_commands() -> list[str]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def _parse_cli(argv: list[str], where: str) -> None:
    try:
        build_parser().parse_args([str(a) for a in argv])
    except SystemExit as exc:
        raise AssertionError(f"{where}: `lvpnet-archive {' '.join(map(str, argv))}` is not a valid command") from exc


# ------------------------------------------------------------------------- compose interpolation

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def _interpolate(value: Any, env: dict[str, str], used: dict[str, str | None]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$.
    `used` records each variable and its default (None: none)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, used) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        used.setdefault(name, arg if op in (":-", "-") else None)
        current = env.get(name)
        if op == ":-":
            return current if current else (arg or "")
        if op == "-":
            return current if current is not None else (arg or "")
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise KeyError(f"compose would refuse to start: {name}: {arg}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def _compose() -> dict[str, Any]:
    [doc] = _docs(COMPOSE)
    return doc


def _compose_filled() -> tuple[dict[str, Any], dict[str, str | None]]:
    """The Compose file as `docker compose config` sees it with .env.example, its empty passwords
    filled in (as the operator must)."""
    env = _env_file(ENV_EXAMPLE)
    env = {k: (v or f"test-{k.lower()}") for k, v in env.items()}
    used: dict[str, str | None] = {}
    return _interpolate(_compose(), env, used), used


# ------------------------------------------------------------------------- kustomize rendering

CLUSTER_SCOPED = {"Namespace"}


def _merge(target: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to the kinds patched here: maps merge, lists of named
    maps (containers, env, volumes) merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = _merge(target[key], value) if key in target else copy.deepcopy(value)
        return merged
    if isinstance(target, list) and isinstance(patch, list):
        if all(isinstance(i, dict) and "name" in i for i in target + patch):
            by_name = {i["name"]: i for i in target}
            result = [(_merge(by_name[i["name"]], i) if i["name"] in by_name else i) for i in patch]
            patched = {i["name"] for i in patch}
            return [i for i in target if i["name"] not in patched] + result
        return copy.deepcopy(patch)
    return copy.deepcopy(patch)


def _generated(kind: str, spec: dict[str, Any], directory: Path) -> dict[str, Any]:
    data: dict[str, str] = {}
    for name in spec.get("envs", []):
        path = directory / name
        if not path.exists() and (directory / f"{name}.example").exists():
            path = directory / f"{name}.example"  # what the operator fills in
        data.update(_env_file(path))
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        obj["type"] = "Opaque"
        obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        obj["data"] = data
    return obj


def _image_name(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return name, tag


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a Deployment or Job, or of the Jobs a CronJob creates."""
    spec = obj.get("spec", {})
    if obj.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return dict(spec.get("template", {}))


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _template(obj).get("spec", {})
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else copy.deepcopy(_docs(path))
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        objects += [_generated(kind, spec, directory) for spec in kustomization.get(key, [])]
    for entry in kustomization.get("patches", []):
        [patch] = _docs(directory / entry["path"])
        target = entry.get("target", {"kind": patch["kind"], "name": patch["metadata"]["name"]})
        matches = [
            i
            for i, o in enumerate(objects)
            if o["kind"] == target.get("kind", o["kind"]) and o["metadata"]["name"] == target.get("name")
        ]
        assert len(matches) == 1, f"{directory}: patch {entry['path']} matches {len(matches)} objects"
        patch_body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        objects[matches[0]] = _merge(objects[matches[0]], patch_body)
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, tag = _image_name(container["image"])
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def validate_object(obj: dict[str, Any], where: str) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        _validate(obj, _schema(f"keda-{obj['kind'].lower()}.json"), f"{where}: {obj['kind']}/{obj['metadata']['name']}")
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(
            f"{where}: {obj['kind']}/{obj['metadata']['name']}: {list(exc.absolute_path)}: {exc.message}"
        ) from exc
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(f"{where}: {exc.message}") from exc


def _rendered() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for name, directory in OVERLAYS.items():
        yield name, render(directory)


def _by(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(_template(workload)["metadata"]["labels"])


# ------------------------------------------------------------------------------------ tests: YAML


def _all_yaml() -> list[Path]:
    return [COMPOSE, *sorted((REPO / "deploy").rglob("*.yaml")), *sorted((REPO / "deploy").rglob("*.yml"))]


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_deployment_yaml_parses(path: Path) -> None:
    for doc in _docs(path):
        if (
            path.parent.is_relative_to(K8S)
            and path.name != "kustomization.yaml"
            and path.name != "kustomizeconfig.yaml"
        ):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: not a Kubernetes object"


# --------------------------------------------------------------------------------- tests: compose


def test_compose_file_matches_the_compose_spec() -> None:
    spec_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(spec_file.read_text())
    _validate(_compose(), schema, "docker-compose.yml")
    filled, _ = _compose_filled()
    _validate(filled, schema, "docker-compose.yml with .env.example")
    # ... and a misspelt key is caught: the check can fail
    broken = copy.deepcopy(filled)
    broken["services"]["api"]["depends_onn"] = broken["services"]["api"].pop("depends_on")
    with pytest.raises(AssertionError):
        _validate(broken, schema, "broken")


def test_compose_services_dependencies_and_profiles() -> None:
    compose, _ = _compose_filled()
    services = compose["services"]
    assert set(services) >= {
        "postgres", "redis", "minio", "createbucket", "migrate", "api", "dicom", "worker", "worker-cpu", "flower",
    }  # fmt: skip
    for name in ("postgres", "redis", "minio", "api", "dicom"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            state = condition["condition"]
            if state == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency} to be healthy: no check"
            elif state == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} is one-shot: restart must be 'no'"
            else:
                raise AssertionError(f"{name}: depends_on {dependency} with condition {state}")
    for name in ("api", "dicom", "worker", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["createbucket"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # The GPU worker reserves an NVIDIA device; the cpu profile's worker reserves none
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["worker"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"]
    assert services["flower"]["profiles"] == ["flower"]
    for name in ("worker", "worker-cpu"):
        assert services[name]["command"] == ["worker", "--queues", "archive,retrieve"]
    assert services["api"]["ports"] == ["8080:8080"] and services["dicom"]["ports"] == ["11112:11112"]
    for name in ("postgres", "redis", "minio"):
        assert any(str(v).split(":")[0].endswith("-data") for v in services[name]["volumes"]), f"{name}: no volume"
    for name, service in services.items():
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: image {image} not pinned"


def test_compose_archive_settings_are_settings_and_start() -> None:
    """Each archive container's environment is a valid Settings, with no exposure refusal (the
    processes listen on 0.0.0.0 there), sharing one catalog, broker and S3 store."""
    compose, _ = _compose_filled()
    services = compose["services"]
    archive = [n for n, s in services.items() if s["image"].split("/")[-1].startswith("archive-")]
    assert set(archive) == {"migrate", "api", "dicom", "worker", "worker-cpu"}
    shared = None
    for name in archive:
        environment = {k: str(v) for k, v in services[name]["environment"].items()}
        unknown = {k for k in environment if k.startswith("ARCHIVE_")} - _settings_fields() - _read_directly()
        assert not unknown, f"{name}: {unknown} are not settings (service/config.py)"
        settings = _settings_from(environment)
        assert settings.resolved_storage_url().startswith("s3://") and settings.s3_endpoint_url == "http://minio:9000"
        assert settings.database_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in settings.database_url
        assert settings.broker_url.startswith("redis://") and "@redis:6379/" in settings.broker_url
        key = (settings.database_url, settings.broker_url, settings.storage_url)
        assert shared in (None, key), f"{name} does not share the catalog/broker/store"
        shared = key
        if name in ("api", "dicom"):
            assert settings.host == "0.0.0.0"
            assert settings.exposure_problems() == [], f"{name} would refuse to start"


def _settings_from(environment: dict[str, str]) -> Settings:
    saved = {k: v for k, v in os.environ.items() if k.startswith("ARCHIVE_")}
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update({k: v for k, v in environment.items() if k.startswith("ARCHIVE_")})
        return Settings()
    finally:
        for key in [k for k in os.environ if k.startswith("ARCHIVE_")]:
            del os.environ[key]
        os.environ.update(saved)


def test_env_example_declares_what_compose_needs_and_holds_no_secret() -> None:
    example = _env_file(ENV_EXAMPLE)
    _, used = _compose_filled()
    required = {name for name, default in used.items() if default is None}
    missing = required - example.keys()
    assert not missing, f".env.example lacks {missing}, which docker-compose.yml needs"
    unused = example.keys() - used.keys() - {"COMPOSE_PROFILES"}
    assert not unused, f".env.example sets {unused}, which docker-compose.yml never reads"
    assert set(example["COMPOSE_PROFILES"].split(",")) <= {"gpu", "cpu", "flower"}
    for key, value in example.items():
        if any(word in key for word in SECRET_WORDS):
            assert value == "", f".env.example commits a value for {key}"
    unknown = {k for k in example if k.startswith("ARCHIVE_")} - _settings_fields() - _read_directly()
    assert not unknown, f".env.example: {unknown} are not settings"
    # An empty password stops compose (${VAR:?...}) instead of starting with no password
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        _interpolate(_compose(), example, {})


# ------------------------------------------------------------------------------ tests: Dockerfiles


def _dockerfile_lines(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _dockerignore_allows(source: str) -> bool:
    allowed = [
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    return source.rstrip("/").lstrip("./") in allowed


@pytest.mark.parametrize("name", ["Dockerfile.service", "Dockerfile.worker"])
def test_dockerfile_copies_what_exists_and_pins_versions(name: str) -> None:
    path = DOCKER / name
    lines = _dockerfile_lines(path)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(lines), re.MULTILINE))
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin, f"{name}: torch {args['TORCH_VERSION']} vs {torch_pin}"
    copies = [shlex.split(line)[1:] for line in lines if line.startswith("COPY ")]
    assert copies, f"{name} copies nothing"
    for words in copies:
        words = [w for w in words if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"{name}: COPY {source}: no such path in the repository"
            assert _dockerignore_allows(source), f"{name}: COPY {source} is excluded by .dockerignore"
    # Every package pyproject.toml installs, its metadata, and the alembic scripts service/db.py loads
    copied = {
        source.rstrip("/").lstrip("./") for words in copies for source in words[:-1] if not source.startswith("-")
    }
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"] if "*" in p}
    assert packages | {"pyproject.toml", pyproject["project"]["readme"], "migrations"} <= copied
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", "\n".join(lines), re.MULTILINE):
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: {image} not pinned"
    assert any(line.startswith("FROM ${") for line in lines)
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert not user.startswith("0") and user.split(":")[0].isdigit(), f"{name}: runs as {user}"
    assert lines[-1].startswith("CMD ") and any(line == 'ENTRYPOINT ["lvpnet-archive"]' for line in lines)
    _parse_cli(json.loads(lines[-1][4:]), f"{name} CMD")
    assert any("python3.11" in line or "python:3.11" in line for line in lines), f"{name}: not Python 3.11"


def test_compose_builds_from_existing_dockerfiles() -> None:
    compose = _compose()
    builds = [s["build"] for s in compose["services"].values() if "build" in s]
    assert {b["dockerfile"] for b in builds} == {"deploy/docker/Dockerfile.service", "deploy/docker/Dockerfile.worker"}
    for build in builds:
        assert (REPO / build["context"] / build["dockerfile"]).is_file()


# ------------------------------------------------------------------------------ tests: CLI commands


def test_every_command_named_is_a_cli_command() -> None:
    compose, _ = _compose_filled()
    commands = 0
    for name, service in compose["services"].items():
        if service["image"].split("/")[-1].startswith("archive-"):
            _parse_cli(service["command"], f"docker-compose.yml {name}")
            commands += 1
    for directory in (BASE, *OVERLAYS.values()):
        for obj in render(directory) if directory != BASE else [d for p in BASE.glob("*.yaml") for d in _docs(p)]:
            for container in _containers(obj):
                if container["image"].startswith(OUR_IMAGES):
                    assert "command" not in container, "the image's ENTRYPOINT is lvpnet-archive: use args"
                    _parse_cli(container["args"], f"{directory.name} {obj['kind']}/{obj['metadata']['name']}")
                    commands += 1
    assert commands >= 10
    # Prose: `lvpnet-archive <command>` in the deployment docs and the README's "Run at scale"
    choices = set(_cli_commands())
    readme = (REPO / "README.md").read_text()
    assert "## Run at scale" in readme and readme.index("## Run on one machine") < readme.index("## Run at scale")
    at_scale = readme.split("## Run at scale", 1)[1].split("\n## ", 1)[0]
    texts = {"README.md (Run at scale)": at_scale, "deploy/README.md": (REPO / "deploy" / "README.md").read_text()}
    texts |= {str(p.relative_to(REPO)): p.read_text() for p in (COMPOSE, *DOCKER.iterdir())}
    for doc, text in texts.items():
        for match in re.finditer(r"(?<![-/\w.])lvpnet-archive +([a-z][a-z-]*)", text):
            before = text[max(0, match.start() - 10) : match.start()]
            if before.endswith(("-n ", "namespace ")):
                continue
            assert match.group(1) in choices, f"{doc}: `lvpnet-archive {match.group(1)}` is no command"


# ------------------------------------------------------------------------------ tests: Kubernetes


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS.values()], ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_is_valid_and_its_files_exist(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    _validate(kustomization, _schema("kustomization.json"), f"{directory}/kustomization.yaml")
    for key in ("resources", "configurations", "components"):
        for entry in kustomization.get(key, []):
            path = directory / entry
            assert path.exists(), f"{directory}: {key} entry {entry} does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file()
    for entry in kustomization.get("patches", []):
        assert (directory / entry["path"]).is_file(), f"{directory}: patch {entry['path']} does not exist"
    for key in ("configMapGenerator", "secretGenerator"):
        for generator in kustomization.get(key, []):
            for env in generator.get("envs", []):
                if key == "secretGenerator":
                    # The operator's file: an example is committed, the file itself is git-ignored
                    assert (directory / f"{env}.example").is_file()
                    assert env in (directory / ".gitignore").read_text().split()
                    assert not (directory / env).exists() or _git_ignored(directory / env)
                else:
                    assert (directory / env).is_file()
    listed = {r for r in kustomization.get("resources", []) if not r.startswith("..")}
    on_disk = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml", "kustomizeconfig.yaml"}
    patches = {p["path"] for p in kustomization.get("patches", [])}
    assert on_disk - listed - patches == set(), f"{directory}: files used by nothing: {on_disk - listed - patches}"


def _git_ignored(path: Path) -> bool:
    result = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, check=False)
    return result.returncode == 0


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_objects_match_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(OVERLAYS[overlay])
    kinds = {o["kind"] for o in objects}
    assert kinds >= {
        "Namespace", "ServiceAccount", "ConfigMap", "Secret", "Deployment", "Service", "Job", "CronJob",
        "PodDisruptionBudget", "NetworkPolicy", "ScaledObject", "TriggerAuthentication",
    }  # fmt: skip
    for obj in objects:
        validate_object(obj, overlay)
    # ... and a wrong field is caught
    broken = copy.deepcopy(_by(objects, "Deployment")["api"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(AssertionError, match="livenessProbes"):
        validate_object(broken, overlay)
    scaled = copy.deepcopy(_by(objects, "ScaledObject")["worker"])
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = "archive"
    with pytest.raises(AssertionError):
        validate_object(scaled, overlay)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rendered_objects_fit_together(overlay: str) -> None:
    objects = render(OVERLAYS[overlay])
    deployments = _by(objects, "Deployment")
    assert set(deployments) == {"api", "dicom", "worker", "retrieve-worker"}
    workloads = [*deployments.values(), *_by(objects, "Job").values(), *_by(objects, "CronJob").values()]
    config = _by(objects, "ConfigMap")["lvpnet-archive-config"]["data"]
    secret_keys = set(_by(objects, "Secret")["lvpnet-archive-secrets"]["data"])
    for workload in workloads:
        name = workload["metadata"]["name"]
        spec = workload["spec"]
        if workload["kind"] == "Deployment":
            assert _selects(spec["selector"]["matchLabels"], _pod_labels(workload)), f"{name}: selector"
        pod = _template(workload)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert _pod_labels(workload)["app.kubernetes.io/part-of"] == "lvpnet-archive"
        for container in pod["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"], name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            sources = {next(iter(s.values()))["name"] for s in container["envFrom"]}
            assert sources == {"lvpnet-archive-config", "lvpnet-archive-secrets"}, name
            assert container["image"].rsplit(":", 1)[1] == "0.1.0"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {config["ARCHIVE_DATA_DIR"], "/tmp"} <= mounts, f"{name}: data dir and /tmp must be writable"
    # Services and budgets select pods that exist
    for service in _by(objects, "Service").values():
        [target] = [d for d in deployments.values() if _selects(service["spec"]["selector"], _pod_labels(d))]
        ports = {
            p["name"]: p["containerPort"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    assert _by(objects, "Service")["dicom"]["spec"]["ports"][0]["port"] == 11112
    for budget in _by(objects, "PodDisruptionBudget").values():
        assert any(_selects(budget["spec"]["selector"]["matchLabels"], _pod_labels(d)) for d in deployments.values())
    assert set(_by(objects, "PodDisruptionBudget")) == {"api", "dicom", "worker", "retrieve-worker"}
    # Probes: the api's on /healthz and /readyz, the SCP's on its port
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["args"] == ["api"] and deployments["dicom"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "dicom"
    ]
    dicom = deployments["dicom"]["spec"]["template"]["spec"]["containers"][0]
    assert dicom["readinessProbe"]["tcpSocket"]["port"] == "dicom"
    # Settings: every ARCHIVE_* is a field, the ConfigMap parses, and the SCP/API would start
    env_names = set(config) | secret_keys
    env_names |= {e["name"] for w in workloads for c in _containers(w) for e in c.get("env", [])}
    unknown = {n for n in env_names if n.startswith("ARCHIVE_")} - _settings_fields() - _read_directly()
    assert not unknown, f"{unknown} are not settings (service/config.py)"
    settings = _settings_from(config)
    assert settings.host == "0.0.0.0" and settings.exposure_problems() == []
    assert settings.resolved_storage_url().startswith("s3://")
    assert {
        "ARCHIVE_DATABASE_URL",
        "ARCHIVE_BROKER_URL",
        "ARCHIVE_ADMIN_PASSWORD",
        "ARCHIVE_SESSION_SECRET",
    } <= secret_keys
    assert not any(any(w in k for w in SECRET_WORDS) for k in config), "a secret in the ConfigMap"
    # The worker and KEDA
    worker = deployments["worker"]["spec"]["template"]["spec"]["containers"][0]
    assert "replicas" not in deployments["worker"]["spec"], "KEDA owns the worker's replica count"
    assert CELERY_ARCHIVE_QUEUE in worker["args"][worker["args"].index("--queues") + 1].split(",")
    scaled = _by(objects, "ScaledObject")["worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] in deployments
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    [trigger] = scaled["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == _celery_archive_queue()
    assert trigger["metadata"]["addressFromEnv"] in config
    auth = _by(objects, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == "lvpnet-archive-secrets" and ref["key"] in secret_keys
    gpu = worker["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpu == "1" and worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert "archive-worker-cuda" in worker["image"]
    else:
        assert gpu is None and worker["image"].startswith("lvpnet/archive-service:")
    # The nightly scrub decodes: the worker image, one run at a time
    scrub_job = _by(objects, "CronJob")["scrub"]
    [scrub] = _containers(scrub_job)
    assert scrub["args"][:2] == ["scrub", "--sample"] and scrub["image"] == worker["image"]
    assert scrub_job["spec"]["concurrencyPolicy"] == "Forbid"
    _check_network_policies(objects, deployments)


def _celery_archive_queue() -> str:
    from worker.celery_app import app

    queue = str(app.conf.task_default_queue)
    assert queue == CELERY_ARCHIVE_QUEUE
    return queue


def _check_network_policies(objects: list[dict[str, Any]], deployments: dict[str, dict[str, Any]]) -> None:
    policies = list(_by(objects, "NetworkPolicy").values())
    pods = {name: _pod_labels(d) for name, d in deployments.items()}
    pods["migrate"] = _pod_labels(_by(objects, "Job")["migrate"])
    pods["scrub"] = _pod_labels(_by(objects, "CronJob")["scrub"])
    for name, labels in pods.items():
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        types = {t for p in selecting for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, f"{name}: not isolated both ways"
        ingress = [rule for p in selecting for rule in p["spec"].get("ingress", [])]
        containers = deployments[name]["spec"]["template"]["spec"]["containers"] if name in deployments else []
        container_ports = {p["containerPort"] for c in containers for p in c.get("ports", [])}
        allowed_in = {port["port"] for rule in ingress for port in rule["ports"]}
        if name == "api":
            assert allowed_in == {8080} == container_ports
        elif name == "dicom":
            assert allowed_in == {11112} == container_ports
        else:
            assert not ingress, f"{name} takes connections: only api and dicom may"
        rules = [r for p in selecting for r in p["spec"].get("egress", [])]
        egress = {(port.get("protocol", "TCP"), port["port"]) for r in rules for port in r["ports"]}
        assert {("UDP", 53), ("TCP", 5432), ("TCP", 6379), ("TCP", 443)} <= egress, f"{name}: egress {egress}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_kustomize_itself_renders_valid_objects(overlay: str, tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    shutil.copy(tree / "base" / "secrets.env.example", tree / "base" / "secrets.env")
    result = subprocess.run(
        ["kubectl", "kustomize", str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    for obj in objects:
        validate_object(obj, f"kustomize {overlay}")
    # Generated names carry a content hash: every reference to them must have followed
    secret = next(o["metadata"]["name"] for o in objects if o["kind"] == "Secret")
    assert secret.startswith("lvpnet-archive-secrets-")
    auth = next(o for o in objects if o["kind"] == "TriggerAuthentication")
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} == {secret}
    mine = render(OVERLAYS[overlay])
    ours = {(o["kind"], o["metadata"]["name"]) for o in mine if o["kind"] not in ("ConfigMap", "Secret")}
    theirs = {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] not in ("ConfigMap", "Secret")}
    assert ours == theirs
    for name in ("worker", "api"):
        [k] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
        [m] = [o for o in mine if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
        assert (
            k["spec"]["template"]["spec"]["containers"][0]["image"]
            == m["spec"]["template"]["spec"]["containers"][0]["image"]
        )
        assert (
            k["spec"]["template"]["spec"]["containers"][0]["resources"]
            == m["spec"]["template"]["spec"]["containers"][0]["resources"]
        )
