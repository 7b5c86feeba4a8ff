"""The container image and the Kubernetes manifests: schema-valid, renderable, and true to the
deployment checklist (probes, resources, security, drain timing, wiring between objects).

No Docker engine and no kustomize binary are needed: the Dockerfile is parsed here, the YAML is
checked against the Kubernetes JSON schemas that `kubernetes-validate` ships, and the kustomize
base and overlay are rendered by the small structural renderer below (resources, namespace,
images, strategic-merge and JSON 6902 patches: the features our kustomizations use; anything
else is refused rather than silently ignored).
"""

from __future__ import annotations

import copy
import fnmatch
import ipaddress
import json
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from qna_gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# 1.30 is the oldest release we support (the preStop `sleep` action is on by default from 1.30);
# 1.34 is where that action is GA.
KUBERNETES_VERSIONS = ("1.30", "1.34")
KUSTOMIZATIONS = {"base": BASE, "production": PRODUCTION}
CONTAINER_PORT = 8000
APP = "qna-gateway"

# The seed's "Example Production Values" and probe values: requirements, not suggestions.
SEED_RESOURCES = {
    "requests": {"memory": "256Mi", "cpu": "100m"},
    "limits": {"memory": "512Mi", "cpu": "500m"},
}
SEED_PROBES = {
    "livenessProbe": {
        "path": "/health",
        "initialDelaySeconds": 10,
        "periodSeconds": 15,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    },
    "readinessProbe": {
        "path": "/ready",
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    },
    "startupProbe": {
        "path": "/health",
        "initialDelaySeconds": 5,
        "periodSeconds": 5,
        "failureThreshold": 30,
    },
}
# Custom resources have no schema in kubernetes-validate; these are checked field by field.
CUSTOM_RESOURCES = {("external-secrets.io", "ExternalSecret")}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
SECRET_LOOKING_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|DATABASE_URL|PRIVATE", re.I)
PLACEHOLDER = "CHANGE_ME"

Manifest = dict[str, Any]


# -- small typed accessors -----------------------------------------------------------------------


def as_map(value: object, where: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{where}: expected a mapping, got {type(value).__name__}"
    return value


def as_list(value: object, where: str) -> list[Any]:
    assert isinstance(value, list), f"{where}: expected a list, got {type(value).__name__}"
    return value


def dig(obj: object, dotted: str) -> Any:
    """`dig(deployment, "spec.template.spec")`; fails naming the missing step."""
    current = obj
    for step in dotted.split("."):
        current = as_map(current, dotted).get(step)
        assert current is not None, f"{dotted}: `{step}` is missing"
    return current


def name_of(obj: Manifest) -> str:
    return str(dig(obj, "metadata.name"))


def api_group(obj: Manifest) -> str:
    api_version = str(obj["apiVersion"])
    return api_version.split("/")[0] if "/" in api_version else ""


def load_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"})


# -- the kustomize renderer ----------------------------------------------------------------------


class RenderError(AssertionError):
    """A kustomization that kustomize itself would refuse, or one this renderer cannot honour."""


SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


@dataclass
class Kustomization:
    directory: Path
    spec: dict[str, Any]
    patch_files: set[Path] = field(default_factory=set)
    resource_files: set[Path] = field(default_factory=set)


def read_kustomization(directory: Path) -> Kustomization:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    docs = load_documents(path)
    if len(docs) != 1:
        raise RenderError(f"{path}: expected one document")
    spec = as_map(docs[0], str(path))
    if spec.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        raise RenderError(f"{path}: apiVersion must be kustomize.config.k8s.io/v1beta1")
    if spec.get("kind") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    return Kustomization(directory, spec)


def render(directory: Path) -> list[Manifest]:
    """What `kustomize build directory` gives, for the features our kustomizations use."""
    kustomization = read_kustomization(directory)
    objects: list[Manifest] = []
    for entry in as_list(kustomization.spec.get("resources", []), "resources"):
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            docs = load_documents(target)
            if not docs:
                raise RenderError(f"{target}: listed as a resource but holds no object")
            objects.extend(as_map(doc, str(target)) for doc in docs)
        else:
            raise RenderError(f"{directory}: resource {entry} does not exist")
    for patch in as_list(kustomization.spec.get("patches", []), "patches"):
        apply_patch(objects, directory, as_map(patch, "patches[]"))
    namespace = kustomization.spec.get("namespace")
    if namespace is not None:
        set_namespace(objects, str(namespace))
    for image in as_list(kustomization.spec.get("images", []), "images"):
        set_image(objects, as_map(image, "images[]"))
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        key = (str(obj.get("kind")), name_of(obj))
        if key in seen:
            raise RenderError(f"{directory}: {key[0]}/{key[1]} is defined twice")
        seen.add(key)
    return objects


def apply_patch(objects: list[Manifest], directory: Path, entry: dict[str, Any]) -> None:
    if "path" in entry:
        patch_path = directory / str(entry["path"])
        if not patch_path.is_file():
            raise RenderError(f"{directory}: patch {entry['path']} does not exist")
        docs = load_documents(patch_path)
        if len(docs) != 1:
            raise RenderError(f"{patch_path}: expected one patch document")
        patch: Any = docs[0]
    elif "patch" in entry:
        patch = yaml.safe_load(str(entry["patch"]))
    else:
        raise RenderError(f"{directory}: a patch needs `path` or `patch`")
    target = entry.get("target")
    if isinstance(patch, list):
        if target is None:
            raise RenderError(f"{directory}: a JSON 6902 patch needs a target")
        matches = select(objects, as_map(target, "target"))
        for obj in matches:
            for operation in patch:
                json6902(obj, as_map(operation, "JSON 6902 operation"))
    else:
        patch_map = as_map(patch, "strategic merge patch")
        selector = (
            as_map(target, "target")
            if target is not None
            else {"kind": patch_map.get("kind"), "name": dig(patch_map, "metadata.name")}
        )
        matches = select(objects, selector)
        body = {k: v for k, v in patch_map.items() if k not in {"apiVersion", "kind"}}
        for obj in matches:
            merged = strategic_merge(obj, body)
            obj.clear()
            obj.update(merged)


def select(objects: list[Manifest], target: dict[str, Any]) -> list[Manifest]:
    def wanted(obj: Manifest) -> bool:
        version = str(obj["apiVersion"]).split("/")[-1]
        return all(
            [
                target.get("kind") in (None, obj.get("kind")),
                target.get("name") in (None, name_of(obj)),
                target.get("group") in (None, api_group(obj)),
                target.get("version") in (None, version),
            ]
        )

    matches = [obj for obj in objects if wanted(obj)]
    if not matches:
        raise RenderError(f"patch target {target} matches no resource")
    return matches


def strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge by key (`null` deletes), lists of named items merge by name, others replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if "$patch" in patch:
            raise RenderError("$patch directives are not implemented")
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged.get(key), value)
        return merged
    named = (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    )
    if named:
        merged_items = copy.deepcopy(base)
        for item in patch:
            index = next((i for i, old in enumerate(base) if old["name"] == item["name"]), None)
            if index is None:
                merged_items.append(copy.deepcopy(item))
            else:
                merged_items[index] = strategic_merge(base[index], item)
        return merged_items
    return copy.deepcopy(patch)


def json6902(obj: Manifest, operation: dict[str, Any]) -> None:
    op = operation.get("op")
    steps = [s.replace("~1", "/").replace("~0", "~") for s in str(operation["path"]).split("/")]
    if steps[0] != "" or len(steps) < 2:
        raise RenderError(f"bad JSON pointer {operation['path']}")
    parent: Any = obj
    for step in steps[1:-1]:
        parent = parent[int(step)] if isinstance(parent, list) else parent[step]
    last = steps[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        else:
            raise RenderError(f"JSON 6902 op {op!r} is not implemented")
    else:
        if op in {"replace", "remove"} and last not in parent:
            raise RenderError(f"JSON 6902 {op}: {operation['path']} does not exist")
        if op in {"add", "replace"}:
            parent[last] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[last]
        else:
            raise RenderError(f"JSON 6902 op {op!r} is not implemented")


def set_namespace(objects: list[Manifest], namespace: str) -> None:
    for obj in objects:
        metadata = as_map(obj["metadata"], "metadata")
        if obj.get("kind") == "Namespace":
            metadata["name"] = namespace  # kustomize renames Namespace objects too
        elif obj.get("kind") not in CLUSTER_SCOPED_KINDS:
            metadata["namespace"] = namespace


def pod_spec_of(obj: Manifest) -> dict[str, Any] | None:
    if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
        return as_map(dig(obj, "spec.template.spec"), "pod spec")
    if obj.get("kind") == "CronJob":
        return as_map(dig(obj, "spec.jobTemplate.spec.template.spec"), "pod spec")
    return None


def split_image(image: str) -> tuple[str, str]:
    """("registry/name", ":tag" or "@digest" or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def set_image(objects: list[Manifest], entry: dict[str, Any]) -> None:
    for obj in objects:
        spec = pod_spec_of(obj)
        if spec is None:
            continue
        for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
            name, reference = split_image(str(container["image"]))
            if name != entry["name"]:
                continue
            new_name = str(entry.get("newName", name))
            if "digest" in entry:
                reference = "@" + str(entry["digest"])
            elif "newTag" in entry:
                reference = ":" + str(entry["newTag"])
            container["image"] = new_name + reference


# -- what the tests look at ----------------------------------------------------------------------


@dataclass(frozen=True)
class Rendering:
    objects: list[Manifest]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def one(self, kind: str) -> Manifest:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def named(self, kind: str, name: str) -> Manifest:
        found = [obj for obj in self.of_kind(kind) if name_of(obj) == name]
        assert found, f"no {kind} named {name}"
        return found[0]


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendering(request: pytest.FixtureRequest) -> Rendering:
    return Rendering(render(KUSTOMIZATIONS[str(request.param)]))


def all_kustomizations() -> list[Kustomization]:
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        kustomization = read_kustomization(path.parent)
        for entry in kustomization.spec.get("resources", []):
            target = (path.parent / str(entry)).resolve()
            if target.is_file():
                kustomization.resource_files.add(target)
        for patch in kustomization.spec.get("patches", []):
            if "path" in patch:
                kustomization.patch_files.add((path.parent / str(patch["path"])).resolve())
        found.append(kustomization)
    return found


def standalone_objects() -> Iterator[tuple[Path, Manifest]]:
    """Every full object in a YAML file under k8s/ (not kustomizations, not patches)."""
    patch_files = set().union(*(k.patch_files for k in all_kustomizations()))
    for path in yaml_files():
        if path.name == "kustomization.yaml" or path.resolve() in patch_files:
            continue
        for doc in load_documents(path):
            yield path, as_map(doc, str(path))


def main_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers = as_list(pod_spec["containers"], "containers")
    assert len(containers) == 1, "one container per pod: the gateway (or the migration)"
    return as_map(containers[0], "container")


def matches(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def template_labels(obj: Manifest) -> dict[str, Any]:
    return as_map(dig(obj, "spec.template.metadata.labels"), "template labels")


def effective(container: dict[str, Any], pod: dict[str, Any], key: str) -> Any:
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    own = container.get("securityContext", {}).get(key)
    return own if own is not None else pod.get("securityContext", {}).get(key)


def settings_for(rendering: Rendering, tmp_path: Path) -> Settings:
    """The gateway's Settings from the Deployment's environment: ConfigMap + secret files."""
    deployment = rendering.one("Deployment")
    container = main_container(dig(deployment, "spec.template.spec"))
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config = rendering.named("ConfigMap", str(dig(source, "configMapRef.name")))
        environ.update({k: str(v) for k, v in as_map(config["data"], "data").items()})
    example = secret_example()
    for variable in container.get("env", []):
        if str(variable["name"]).endswith("_FILE"):
            key = Path(str(variable["value"])).name
            copy_of_secret = tmp_path / key
            copy_of_secret.write_text(str(example["stringData"][key]), encoding="utf-8")
            environ[str(variable["name"])] = str(copy_of_secret)
    return Settings.from_env(environ, env_file=None)


def secret_example() -> Manifest:
    docs = load_documents(BASE / "secret.example.yaml")
    assert len(docs) == 1
    return as_map(docs[0], "secret.example.yaml")


# -- the YAML files ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_file_parses_and_has_a_role(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path} is empty"
    kustomizations = all_kustomizations()
    roles = {
        "kustomization": path.name == "kustomization.yaml",
        "resource": any(path.resolve() in k.resource_files for k in kustomizations),
        "patch": any(path.resolve() in k.patch_files for k in kustomizations),
        "example": path.name.endswith(".example.yaml"),
    }
    assert sum(roles.values()) == 1, f"{path.relative_to(K8S)} roles: {roles}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_the_kubernetes_schemas(version: str) -> None:
    objects = [(str(path.relative_to(K8S)), obj) for path, obj in standalone_objects()]
    for label, directory in KUSTOMIZATIONS.items():
        objects += [(f"rendered {label}", obj) for obj in render(directory)]
    checked = 0
    for where, obj in objects:
        if (api_group(obj), obj.get("kind")) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(step) for step in exc.path)
            pytest.fail(f"{where} {obj['kind']}/{name_of(obj)} @ {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")
        checked += 1
    assert checked >= 20


def test_the_external_secret_is_well_formed() -> None:
    found = [obj for _, obj in standalone_objects() if obj.get("kind") == "ExternalSecret"]
    assert len(found) == 1
    external = found[0]
    assert external["apiVersion"] in {"external-secrets.io/v1", "external-secrets.io/v1beta1"}
    spec = as_map(external["spec"], "spec")
    assert set(spec) <= {"refreshInterval", "secretStoreRef", "target", "data", "dataFrom"}
    assert re.fullmatch(r"\d+[smh]", str(spec["refreshInterval"]))
    assert spec["secretStoreRef"] == {"name": "vault-backend", "kind": "ClusterSecretStore"}
    assert dig(spec, "target.name") == name_of(secret_example())
    assert dig(spec, "target.creationPolicy") in {"Owner", "Orphan", "Merge", "None"}
    data = [as_map(item, "data[]") for item in as_list(spec["data"], "data")]
    for item in data:
        assert set(item) == {"secretKey", "remoteRef"}
        assert set(item["remoteRef"]) <= {"key", "property", "version", "decodingStrategy"}
        assert item["remoteRef"]["key"]
    assert {item["secretKey"] for item in data} == set(secret_example()["stringData"])
    assert (PRODUCTION / "externalsecret.yaml").resolve() in {
        path for k in all_kustomizations() for path in k.resource_files
    }


def test_the_secret_example_holds_placeholders_only_and_stays_out_of_the_build() -> None:
    secret = secret_example()
    assert secret["kind"] == "Secret"
    assert secret["type"] == "Opaque"
    assert "data" not in secret, "base64 `data` would hide what the values are"
    values = as_map(secret["stringData"], "stringData")
    assert values
    for key, value in values.items():
        assert PLACEHOLDER in str(value), f"{key} is not a placeholder"
        assert not re.search(r"sk-[A-Za-z0-9_-]{16,}", str(value)), f"{key} looks like a real key"
    for label, directory in KUSTOMIZATIONS.items():
        assert not Rendering(render(directory)).of_kind("Secret"), f"{label} renders a Secret"
    example = (BASE / "secret.example.yaml").resolve()
    assert all(example not in k.resource_files for k in all_kustomizations())


# -- rendering -----------------------------------------------------------------------------------


def test_the_base_and_the_overlay_render() -> None:
    base = Rendering(render(BASE))
    production = Rendering(render(PRODUCTION))
    kinds = {str(obj["kind"]) for obj in base.objects}
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
    }
    assert {"Namespace", "ExternalSecret"} <= {str(obj["kind"]) for obj in production.objects}
    for obj in production.objects:
        if obj["kind"] != "Namespace":
            assert dig(obj, "metadata.namespace") == "qna", name_of(obj)
    # The overlay's patches and images took effect.
    assert dig(production.one("Deployment"), "spec.replicas") == 3
    assert dig(production.one("HorizontalPodAutoscaler"), "spec.minReplicas") == 3
    assert dig(production.one("Ingress"), "spec.rules")[0]["host"] == "qna.example.org"
    for kind in ("Deployment", "Job"):
        container = main_container(dig(production.one(kind), "spec.template.spec"))
        assert container["image"] == "registry.example.com/qna/qna-gateway:0.1.0"
    # ... and did not leak into the base.
    assert dig(base.one("Deployment"), "spec.replicas") == 2


def test_the_renderer_refuses_what_kustomize_would(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [missing.yaml]\n",
        encoding="utf-8",
    )
    with pytest.raises(RenderError, match="does not exist"):
        render(tmp_path)
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n", encoding="utf-8"
    )
    (tmp_path / "patch.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {x: y}\n", encoding="utf-8"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [cm.yaml, cm.yaml]\n",
        encoding="utf-8",
    )
    with pytest.raises(RenderError, match="defined twice"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [cm.yaml]\npatches: [{path: patch.yaml}]\n",
        encoding="utf-8",
    )
    with pytest.raises(RenderError, match="matches no resource"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [cm.yaml]\ncommonLabels: {a: b}\n",
        encoding="utf-8",
    )
    with pytest.raises(RenderError, match="does not implement"):
        render(tmp_path)


# -- the checklist, in both renderings -----------------------------------------------------------


def test_probes_follow_the_seed_values(rendering: Rendering) -> None:
    container = main_container(dig(rendering.one("Deployment"), "spec.template.spec"))
    ports = {str(p["name"]): p["containerPort"] for p in container["ports"]}
    assert ports == {"http": CONTAINER_PORT}
    for probe_name, expected in SEED_PROBES.items():
        probe = as_map(container[probe_name], probe_name)
        port = dig(probe, "httpGet.port")
        assert ports.get(port, port) == CONTAINER_PORT, probe_name
        assert dig(probe, "httpGet.path") == expected["path"], probe_name
        for key, value in expected.items():
            if key != "path":
                assert probe.get(key) == value, f"{probe_name}.{key}"


def test_resources_follow_the_seed_values(rendering: Rendering) -> None:
    for kind in ("Deployment", "Job"):
        container = main_container(dig(rendering.one(kind), "spec.template.spec"))
        assert container["resources"] == SEED_RESOURCES, kind


def test_pods_run_locked_down(rendering: Rendering) -> None:
    uid, gid = dockerfile_user()
    for kind in ("Deployment", "Job"):
        pod = as_map(dig(rendering.one(kind), "spec.template.spec"), "pod spec")
        container = main_container(pod)
        assert effective(container, pod, "runAsNonRoot") is True, kind
        assert effective(container, pod, "runAsUser") == uid, kind
        assert effective(container, pod, "runAsGroup") == gid, kind
        assert effective(container, pod, "seccompProfile") == {"type": "RuntimeDefault"}, kind
        security = as_map(container["securityContext"], "securityContext")
        assert security["readOnlyRootFilesystem"] is True, kind
        assert security["allowPrivilegeEscalation"] is False, kind
        assert security["capabilities"] == {"drop": ["ALL"]}, kind
        assert pod.get("hostNetwork", False) is False
        # Writable: only /tmp, an emptyDir. Everything else is mounted read-only.
        volumes = {str(v["name"]): as_map(v, "volume") for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            if mount["mountPath"] == "/tmp":
                assert "emptyDir" in volumes[mount["name"]], kind
            else:
                assert mount.get("readOnly") is True, f"{kind} {mount['mountPath']}"


def test_the_service_account_has_no_token_and_no_permissions(rendering: Rendering) -> None:
    account = rendering.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for kind in ("Deployment", "Job"):
        pod = as_map(dig(rendering.one(kind), "spec.template.spec"), "pod spec")
        assert pod["serviceAccountName"] == name_of(account), kind
        assert pod["automountServiceAccountToken"] is False, kind
    # The gateway never calls the Kubernetes API: least privilege is no RBAC binding at all.
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert not rendering.of_kind(kind)


def test_the_drain_fits_in_the_grace_period(rendering: Rendering, tmp_path: Path) -> None:
    pod = as_map(dig(rendering.one("Deployment"), "spec.template.spec"), "pod spec")
    pre_stop = as_map(dig(main_container(pod), "lifecycle.preStop"), "preStop")
    if "sleep" in pre_stop:
        pause = int(dig(pre_stop, "sleep.seconds"))
    else:
        command = " ".join(dig(pre_stop, "exec.command"))
        found = re.search(r"sleep\(?\s*(\d+)", command)
        assert found, f"preStop does not pause: {command}"
        pause = int(found.group(1))
    assert 1 <= pause <= 15
    settings = settings_for(rendering, tmp_path)
    # The drain, plus a margin for the last database writes and the span flush.
    assert pod["terminationGracePeriodSeconds"] >= pause + settings.drain_seconds + 10


def test_the_configmap_configures_the_gateway_for_a_container(
    rendering: Rendering, tmp_path: Path
) -> None:
    settings = settings_for(rendering, tmp_path)
    assert ipaddress.ip_address(settings.host).is_unspecified
    assert settings.port == CONTAINER_PORT
    assert settings.log_format == "json"
    assert settings.database_url is not None, "DATABASE_URL_FILE must be wired to the Secret"
    assert settings.openai_api_key is not None
    assert settings.kb_dir == Path("/app/kb")
    pod = as_map(dig(rendering.one("Deployment"), "spec.template.spec"), "pod spec")
    mounts = {str(m["mountPath"]): str(m["name"]) for m in main_container(pod)["volumeMounts"]}
    volumes = {str(v["name"]): as_map(v, "volume") for v in pod["volumes"]}
    kb_volume = volumes[mounts[str(settings.kb_dir)]]
    kb = rendering.named("ConfigMap", str(dig(kb_volume, "configMap.name")))
    documents = as_map(kb["data"], "kb data")
    assert len(documents) >= 2
    assert all(Path(name).suffix in {".md", ".txt"} for name in documents)


def test_every_setting_in_the_configmap_is_one_the_code_reads(rendering: Rendering) -> None:
    """A misspelt variable would be ignored without a word; catch it here."""
    source = "\n".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "src" / "qna_gateway").rglob("*.py")
    )
    config = rendering.named("ConfigMap", "qna-gateway-config")
    for key in as_map(config["data"], "data"):
        assert f'"{key}"' in source, f"{key} is read nowhere in src/qna_gateway"


def test_traces_go_where_the_network_policy_lets_them(rendering: Rendering) -> None:
    data = as_map(rendering.named("ConfigMap", "qna-gateway-config")["data"], "data")
    endpoint = urlsplit(str(data["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    protocol = str(data.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
    # OTLP's well-known ports: 4317 for gRPC, 4318 for HTTP.
    assert endpoint.port == {"grpc": 4317, "http/protobuf": 4318}[protocol]
    policy = rendering.one("NetworkPolicy")
    allowed = {port["port"] for rule in dig(policy, "spec.egress") for port in rule["ports"]}
    assert endpoint.port in allowed


def test_secrets_come_from_one_secret_as_files(rendering: Rendering) -> None:
    secret_name = name_of(secret_example())
    keys = set(secret_example()["stringData"])
    for kind in ("Deployment", "Job"):
        pod = as_map(dig(rendering.one(kind), "spec.template.spec"), "pod spec")
        container = main_container(pod)
        secret_volumes = {str(v["name"]): v["secret"] for v in pod["volumes"] if "secret" in v}
        assert [v["secretName"] for v in secret_volumes.values()] == [secret_name], kind
        mount = next(m for m in container["volumeMounts"] if m["name"] in secret_volumes)
        file_variables = [v for v in container["env"] if str(v["name"]).endswith("_FILE")]
        assert file_variables, kind
        for variable in file_variables:
            path = Path(str(variable["value"]))
            assert path.parent == Path(str(mount["mountPath"])), variable["name"]
            assert path.name in keys, variable["name"]
        # Secrets never travel as plain environment values.
        for variable in container["env"]:
            if SECRET_LOOKING_NAME.search(str(variable["name"])):
                assert str(variable["name"]).endswith("_FILE"), variable["name"]
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, kind


def test_service_ingress_and_scrape_point_at_the_gateway(rendering: Rendering) -> None:
    deployment = rendering.one("Deployment")
    pod_labels = template_labels(deployment)
    assert matches(dig(deployment, "spec.selector.matchLabels"), pod_labels)
    service = rendering.one("Service")
    assert dig(service, "spec.type") == "ClusterIP"
    selector = as_map(dig(service, "spec.selector"), "selector")
    assert matches(selector, pod_labels)
    assert not matches(selector, template_labels(rendering.one("Job")))
    assert dig(service, "spec.ports") == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    ]
    ingress = rendering.one("Ingress")
    annotations = as_map(dig(ingress, "metadata.annotations"), "annotations")
    assert annotations["cert-manager.io/cluster-issuer"]
    nginx = "nginx.ingress.kubernetes.io/"
    assert annotations[nginx + "proxy-buffering"] == "off"
    assert annotations[nginx + "proxy-request-buffering"] == "off"
    assert int(annotations[nginx + "proxy-read-timeout"]) >= 3600
    assert int(annotations[nginx + "proxy-send-timeout"]) >= 3600
    tls_hosts = {host for tls in dig(ingress, "spec.tls") for host in tls["hosts"]}
    for rule in dig(ingress, "spec.rules"):
        assert rule["host"] in tls_hosts, "every host is served over TLS"
        for path in dig(rule, "http.paths"):
            backend = as_map(dig(path, "backend.service"), "backend")
            assert backend["name"] == name_of(service)
            port = as_map(backend["port"], "backend port")
            assert any(
                port.get("name", port.get("number")) in (p["name"], p["port"])
                for p in dig(service, "spec.ports")
            )
    scrape = as_map(dig(deployment, "spec.template.metadata.annotations"), "annotations")
    assert scrape == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(CONTAINER_PORT),
        "prometheus.io/path": "/metrics",
    }


def test_autoscaling_and_disruption_budget(rendering: Rendering) -> None:
    deployment = rendering.one("Deployment")
    hpa = rendering.one("HorizontalPodAutoscaler")
    assert dig(hpa, "spec.scaleTargetRef") == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name_of(deployment),
    }
    assert 2 <= dig(hpa, "spec.minReplicas") <= dig(hpa, "spec.maxReplicas") == 10
    assert dig(deployment, "spec.replicas") == dig(hpa, "spec.minReplicas")
    assert dig(hpa, "spec.metrics") == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]
    pdb = rendering.one("PodDisruptionBudget")
    assert matches(dig(pdb, "spec.selector.matchLabels"), template_labels(deployment))
    spec = as_map(pdb["spec"], "pdb spec")
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 1
    assert dig(deployment, "spec.strategy.rollingUpdate.maxUnavailable") == 0


def test_the_network_policy_allows_only_what_the_gateway_uses(rendering: Rendering) -> None:
    policy = rendering.one("NetworkPolicy")
    selector = as_map(dig(policy, "spec.podSelector.matchLabels"), "podSelector")
    for kind in ("Deployment", "Job"):
        assert matches(selector, template_labels(rendering.one(kind))), kind
    assert sorted(dig(policy, "spec.policyTypes")) == ["Egress", "Ingress"]
    for rule in dig(policy, "spec.ingress"):
        assert rule["from"], "ingress comes from named peers only"
        assert rule["ports"] == [{"protocol": "TCP", "port": CONTAINER_PORT}]
    peers = [peer for rule in dig(policy, "spec.ingress") for peer in rule["from"]]
    namespaces = {
        dig(peer, "namespaceSelector.matchLabels")["kubernetes.io/metadata.name"] for peer in peers
    }
    assert namespaces == {"ingress-nginx", "monitoring"}
    egress = {
        (port["protocol"], port["port"])
        for rule in dig(policy, "spec.egress")
        for port in rule["ports"]
    }
    assert egress == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5432),
        ("TCP", 443),
        ("TCP", 4317),
        ("TCP", 4318),
    }


def test_the_migration_job_migrates_and_cleans_up(rendering: Rendering) -> None:
    job = rendering.one("Job")
    container = main_container(dig(job, "spec.template.spec"))
    assert container["command"] == ["qna-gateway", "migrate"]
    deployment_container = main_container(dig(rendering.one("Deployment"), "spec.template.spec"))
    assert deployment_container["command"] == dockerfile_cmd()
    assert container["image"] == deployment_container["image"]
    assert 0 < dig(job, "spec.backoffLimit") <= 6
    assert dig(job, "spec.ttlSecondsAfterFinished") > 0
    assert dig(job, "spec.template.spec.restartPolicy") in {"Never", "OnFailure"}


def test_labels_are_consistent(rendering: Rendering) -> None:
    server = template_labels(rendering.one("Deployment"))["app.kubernetes.io/component"]
    for kind in (
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ):
        labels = as_map(dig(rendering.one(kind), "metadata.labels"), kind)
        assert labels.get("app.kubernetes.io/component") == server, kind
    for obj in rendering.objects:
        labels = as_map(dig(obj, "metadata.labels"), f"{obj['kind']} labels")
        assert labels.get("app.kubernetes.io/part-of") == APP, obj["kind"]
        if obj["kind"] != "Namespace":
            assert labels.get("app.kubernetes.io/name") == APP, obj["kind"]
            assert labels.get("app.kubernetes.io/instance") == APP, obj["kind"]
        if pod_spec_of(obj) is not None:
            pod_labels = template_labels(obj)
            for key in ("name", "instance", "component", "part-of"):
                full = f"app.kubernetes.io/{key}"
                assert pod_labels.get(full) == labels.get(full), f"{obj['kind']} {full}"


# -- the Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, continuation lines joined, global ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        args = args.strip()
        if instruction == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, alias))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, args))
    return stages


def key_values(args: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in shlex.split(args))


def dockerfile_user() -> tuple[int, int]:
    users = dockerfile_stages()[-1].all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)


def dockerfile_cmd() -> list[str]:
    commands = dockerfile_stages()[-1].all("CMD")
    assert len(commands) == 1
    command = json.loads(commands[0])  # exec form is a JSON array; shell form does not parse
    assert isinstance(command, list)
    return [str(word) for word in command]


def test_the_dockerfile_is_multi_stage_on_a_slim_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", runtime.base)
    copies_from = [args for args in runtime.all("COPY") if args.startswith("--from=")]
    assert any(args.startswith(f"--from={builder.name} ") for args in copies_from)
    assert not runtime.all("ADD"), "COPY only: ADD fetches URLs and unpacks archives"


def test_the_image_runs_unprivileged_and_read_only() -> None:
    uid, gid = dockerfile_user()
    assert uid >= 10000
    assert gid >= 10000
    runtime = dockerfile_stages()[-1]
    environment: dict[str, str] = {}
    for args in runtime.all("ENV"):
        environment.update(key_values(args))
    assert ipaddress.ip_address(environment["QNA_HOST"]).is_unspecified
    assert environment["QNA_PORT"] == str(CONTAINER_PORT)
    assert environment["QNA_KB_DIR"] == "/app/kb"
    assert "COPY kb /app/kb" in [f"COPY {args}" for args in runtime.all("COPY")]
    # Nothing writes outside /tmp: no bytecode files, and home and data folders under /tmp.
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["HOME"].startswith("/tmp")
    assert environment["QNA_DATA_DIR"].startswith("/tmp/")
    assert not runtime.all("VOLUME"), "a VOLUME would hide the baked-in kb from overrides"
    assert runtime.all("EXPOSE") == [str(CONTAINER_PORT)]
    assert dockerfile_cmd() == ["qna-gateway", "serve"]


def test_the_dockerfile_holds_no_secret() -> None:
    for stage in dockerfile_stages():
        for instruction, args in stage.instructions:
            if instruction in {"ENV", "ARG"}:
                for name in key_values(args):
                    assert not SECRET_LOOKING_NAME.search(name), f"{instruction} {name}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"sk-[A-Za-z0-9_-]{16,}|postgres(ql)?://\S+:\S+@", text)


def test_the_dockerignore_keeps_local_state_out_but_the_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (
        ".git",
        ".venv",
        ".env",
        ".qna-data",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "**/__pycache__",
        "test-output",
    ):
        assert required in patterns, required

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    sources = []
    for stage in dockerfile_stages():
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if not args.startswith("--from="):
                sources += words[:-1]
    assert {"pyproject.toml", "README.md", "src", "kb"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), f"{source} is copied but .dockerignore drops it"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_command_works_without_curl(status: int, healthy: bool) -> None:
    checks = dockerfile_stages()[-1].all("HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert all(option.startswith("--") for option in options.split())
    argv = json.loads(command)
    assert argv[0] == "python", "the image's Python, not curl or wget (the slim image has none)"
    handler = type("Health", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [sys.executable, *argv[1:]],
            env={"QNA_PORT": str(server.server_address[1])},
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (result.returncode == 0) is healthy, result.stderr.decode()
