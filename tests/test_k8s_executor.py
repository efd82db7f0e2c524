"""The Kubernetes executor (jobs/executors/kubernetes.py), without a cluster.

- What it renders is validated offline: the ConfigMap and the batch/v1 Job against the upstream
  Kubernetes JSON schemas that `kubernetes-validate` ships (strict: unknown keys are errors). No
  package ships the Training Operator's PyTorchJob CRD schema, so PYTORCHJOB_SCHEMA below is a
  minimal one written here: the CRD's spec levels (kubeflow.org/v1, Training Operator v1.9,
  manifests/base/crds/kubeflow.org_pytorchjobs.yaml) and what its validating webhook adds (replica
  types Master/Worker, one Master, a container named `pytorch`), closed to unknown keys; the pod
  template of each replica is checked against Kubernetes' own strict PodTemplateSpec schema.
- The rendered train config loads in train's own loader, and the multi-node command, run by `sh`
  with the operator's environment, reaches a torchrun plan through `train --dry-run`.
- start/state/cancel/logs go through the official client to FakeKubeApi, a fake API server (an
  in-process HTTP server that answers the REST paths used, keeps what is created in a dict and
  records each request; it has no controllers, so tests set the status a controller would).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes_validate.utils import all_versions, major_minor, schema_contents
from referencing import Registry, Resource

from jobs.executors.kubernetes import JobSpec, KubernetesExecutor
from kernel.errors import GuardtuneError
from training.config import load_config

K8S_VERSIONS = ("1.33", "1.37")  # the deploy manifests' version (tests/test_deploy.py), and the client's (37.x)
NS = "guardtune"
CONFIG = {"task": "sales", "train_file": "data/sales.jsonl", "method": "lora", "max_steps": 20}
JOBS = {
    "cpu-1node": JobSpec("j-20261129-0001", CONFIG, memory_bytes=3 * 2**30 + 1),
    "gpu-1node": JobSpec("j-20261129-0002", CONFIG, gpus_per_node=4, memory_bytes=40 * 2**30),
    "gpu-2node": JobSpec("J-20261129-0003", {**CONFIG, "deepspeed": "zero2"}, nodes=2, gpus_per_node=8,
                         memory_bytes=60 * 2**30),
}


# --- schemas --------------------------------------------------------------------------------------

DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
PYTORCHJOB_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {"$ref": DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["pytorchReplicaSpecs"],
            "properties": {
                "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": INT32,
                    "cleanPodPolicy": {"enum": ["All", "Running", "None"]}, "managedBy": {"type": "string"},
                    "schedulingPolicy": {"type": "object"}, "suspend": {"type": "boolean"},
                    "ttlSecondsAfterFinished": INT32}},
                "elasticPolicy": {"type": "object"},
                "nprocPerNode": {"type": "string"},
                "pytorchReplicaSpecs": {
                    "type": "object", "minProperties": 1, "additionalProperties": False,
                    "properties": {
                        "Master": {"allOf": [{"$ref": "#/$defs/replica"}, {"properties": {"replicas": {"const": 1}}}]},
                        "Worker": {"$ref": "#/$defs/replica"}}}}}},
    "$defs": {"replica": {
        "type": "object", "additionalProperties": False, "required": ["replicas", "template"],
        "properties": {
            "replicas": {**INT32, "minimum": 1},
            "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
            "template": {"allOf": [
                {"$ref": DEFS + "io.k8s.api.core.v1.PodTemplateSpec"},
                {"required": ["spec"], "properties": {"spec": {"properties": {"containers": {
                    "contains": {"properties": {"name": {"const": "pytorch"}}},
                    "items": {"required": ["name", "image"]}}}}}}]}}}},
}


def pytorchjob_validator(version: str) -> jsonschema.Draft202012Validator:
    directory = next(v for v in reversed(all_versions()) if major_minor(v) <= version)
    defs = schema_contents(f"kubernetes-json-schema/v{directory}-local-strict/_definitions.json", version)
    return jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA, registry=Resource.from_contents(defs) @ Registry())


def validate(obj: dict, version: str) -> None:
    """Raise when the object does not match its schema (kv.ValidationError or jsonschema.ValidationError)."""
    if obj["kind"] == "PyTorchJob":
        pytorchjob_validator(version).validate(obj)
    else:
        kv.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", JOBS)
def test_rendered_objects_validate_against_the_schemas(case, version):
    objs = KubernetesExecutor().render(JOBS[case])
    assert [o["kind"] for o in objs] == ["ConfigMap", "PyTorchJob" if "2node" in case else "Job"]
    for obj in objs:
        validate(obj, version)


def test_the_schema_checks_refuse_broken_objects():
    ex = KubernetesExecutor()
    _, job = ex.render(JOBS["gpu-1node"])
    _, ptj = ex.render(JOBS["gpu-2node"])

    def broken(obj, change):
        bad = json.loads(json.dumps(obj))
        change(bad)
        return bad

    def container(obj, role="Master"):
        spec = obj["spec"]["template"] if obj["kind"] == "Job" else obj["spec"]["pytorchReplicaSpecs"][role]["template"]
        return spec["spec"]["containers"][0]

    errors = (kv.ValidationError, jsonschema.ValidationError)
    for bad in (
        broken(job, lambda o: container(o).update(volumeMount=container(o).pop("volumeMounts"))),  # misspelt
        broken(job, lambda o: o["spec"].update(backoffLimit="three")),
        broken(ptj, lambda o: container(o, "Worker").update(comand=container(o, "Worker").pop("command"))),
        broken(ptj, lambda o: container(o).update(name="train")),  # the operator needs `pytorch`
        broken(ptj, lambda o: o["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2)),
        broken(ptj, lambda o: o["spec"]["pytorchReplicaSpecs"].update(Chief=o["spec"]["pytorchReplicaSpecs"]["Worker"])),
        broken(ptj, lambda o: o["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes")),
        broken(ptj, lambda o: o["spec"].update(runPolicy={"backofLimit": 3})),
    ):
        with pytest.raises(errors):
            validate(bad, "1.33")


# --- what runs in the pods ------------------------------------------------------------------------

def pod_spec(obj: dict, role: str = "Master") -> dict:
    if obj["kind"] == "Job":
        return obj["spec"]["template"]["spec"]
    return obj["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]


def test_one_node_jobs_run_train_on_the_volume(tmp_path):
    ex = KubernetesExecutor(namespace=NS, image="registry.example/guardtune:cuda", pvc="train-data",
                            service_account="trainer")
    for case, gpus in (("cpu-1node", 0), ("gpu-1node", 4)):
        cm, job = ex.render(JOBS[case])
        name = JOBS[case].id
        assert job["metadata"] == {"name": name, "namespace": NS, "labels": {
            "app.kubernetes.io/name": "guardtune", "app.kubernetes.io/component": "train", "guardtune.io/job": name}}
        assert job["spec"]["backoffLimit"] == 3
        pod = pod_spec(job)
        (c,) = pod["containers"]
        assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "trainer"
        assert c["command"] == ["tini", "--", "train", "/config/train.yaml"]  # the config is train's positional arg
        assert c["image"] == "registry.example/guardtune:cuda" and c["workingDir"] == "/data"
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]
        memory = {"cpu-1node": "3073Mi", "gpu-1node": "40960Mi"}[case]  # rounded up to whole MiB
        assert c["resources"].get("requests") == {"memory": memory}
        assert c["resources"].get("limits") == ({"nvidia.com/gpu": "4"} if gpus else None)
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "train-data"}
        assert volumes["config"]["configMap"] == {"name": cm["metadata"]["name"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts == {"config": "/config", "data": "/data", "dshm": "/dev/shm"}

        # The config file is what train loads: the data path resolved on the volume, results on it too.
        cfg = yaml.safe_load(cm["data"]["train.yaml"])
        assert cfg["resume"] == "auto"
        assert cfg["train_file"] == "/data/data/sales.jsonl"
        assert (cfg["output_dir"], cfg["run_dir"]) == ("/data/adapters/sales", f"/data/runs/{name}")
        assert (cfg["nnodes"], cfg["nproc"]) == (1, gpus or 1)
        path = tmp_path / f"{case}.yaml"
        path.write_text(cm["data"]["train.yaml"])
        loaded = load_config(path)
        assert str(loaded.train_file) == "/data/data/sales.jsonl" and loaded.resume == "auto"
        assert loaded.distributed == (gpus > 1)  # 4 GPUs: train starts torchrun with one rank per GPU


def test_two_node_pytorchjob_runs_the_multi_node_launch_from_the_operators_env(tmp_path):
    cm, ptj = KubernetesExecutor().render(JOBS["gpu-2node"])
    name = "j-20261129-0003"  # the id, lowered
    assert ptj["metadata"]["name"] == name
    assert ptj["spec"]["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "None"}
    replicas = ptj["spec"]["pytorchReplicaSpecs"]
    assert {r: (s["replicas"], s["restartPolicy"]) for r, s in replicas.items()} == {
        "Master": (1, "OnFailure"), "Worker": (1, "OnFailure")}
    assert "nprocPerNode" not in ptj["spec"]  # so WORLD_SIZE counts nodes and RANK is the node's index
    for role in replicas:
        (c,) = pod_spec(ptj, role)["containers"]
        assert c["name"] == "pytorch" and c["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
        assert c["resources"] == {"requests": {"memory": "61440Mi"}, "limits": {"nvidia.com/gpu": "8"}}
        assert c["command"][:4] == ["tini", "--", "sh", "-c"]
    assert pod_spec(ptj, "Master")["containers"] == pod_spec(ptj, "Worker")["containers"]

    # The node script, run by sh with the environment the operator sets on a worker: it resolves the
    # master's name to an address and hands train the topology.
    script = pod_spec(ptj)["containers"][0]["command"][4]
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "train").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (stub / "train").chmod(0o755)
    env = {"PATH": f"{stub}:{Path(sys.executable).parent}:/usr/bin:/bin", "ARGS_OUT": str(tmp_path / "args"),
           "MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    assert args == ["/config/train.yaml", "nnodes=2", "node_rank=1", "master_addr=127.0.0.1", "master_port=29500"]

    # Those arguments on the rendered config, through the real `train --dry-run` (node 0's address
    # as a cluster would give it: train refuses a loopback master for several nodes).
    cfg = tmp_path / "train.yaml"
    cfg.write_text(cm["data"]["train.yaml"])
    args = [str(cfg), *[a.replace("127.0.0.1", "10.0.0.1") for a in args[1:]], "--dry-run"]
    p = subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("node 1 "))
    assert "--nnodes 2 --nproc-per-node 8 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500" in line
    assert "checked: world size 16 = 2 node(s) x 8 process(es); deepspeed zero2" in p.stdout


def test_job_specs_the_cluster_cannot_run_are_refused():
    ex = KubernetesExecutor()
    bad = [
        (JobSpec("j_1", CONFIG), "cannot name Kubernetes objects"),
        (JobSpec("1-job", CONFIG), "cannot name Kubernetes objects"),
        (JobSpec("j-" + "x" * 60, CONFIG), "cannot name Kubernetes objects"),
        (JobSpec("j-1", {**CONFIG, "hostfile": "hosts"}, nodes=2), "hostfile cannot be set"),
        (JobSpec("j-1", {**CONFIG, "nproc": 2}, gpus_per_node=4), "nproc 2 in the config, but the job asks for 4"),
        (JobSpec("j-1", {**CONFIG, "nnodes": 3}, nodes=2), "nnodes 3 in the config"),
        (JobSpec("j-1", {**CONFIG, "launcher": "deepspeed"}, nodes=2), "launcher deepspeed"),
        (JobSpec("j-1", {**CONFIG, "output_dir": "/tmp/out"}), "output_dir /tmp/out is not on the volume"),
        (JobSpec("j-1", {**CONFIG, "run_dir": "../runs"}), "run_dir /runs is not on the volume"),
        (JobSpec("j-1", {**CONFIG, "learnin_rate": 1e-4}), "learnin_rate"),  # train's own schema
    ]
    for spec, message in bad:
        with pytest.raises(GuardtuneError, match=re.escape(message)):
            ex.render(spec)
    # A CPU job keeps its own ranks; absolute paths (the volume mounted where the platform keeps them) stay.
    cm, _ = KubernetesExecutor(mount_path="/srv/platform").render(JobSpec("j-1", {
        **CONFIG, "fsdp": True, "nproc": 2, "train_file": "/srv/platform/data/a.jsonl",
        "run_dir": "/srv/platform/runs/j-1", "resume": "never"}))
    cfg = yaml.safe_load(cm["data"]["train.yaml"])
    assert (cfg["nproc"], cfg["train_file"], cfg["run_dir"]) == (2, "/srv/platform/data/a.jsonl", "/srv/platform/runs/j-1")
    assert cfg["output_dir"] == "/srv/platform/adapters/sales" and cfg["resume"] == "auto"
    # A config that spells out train's defaults for the keys the executor owns asks for nothing.
    defaults = {"hostfile": None, "node_rank": 0, "master_addr": "127.0.0.1", "dry_run": False, "nnodes": 1, "nproc": 1}
    cm, _ = ex.render(JobSpec("j-1", {**CONFIG, **defaults}, nodes=2, gpus_per_node=8))
    cfg = yaml.safe_load(cm["data"]["train.yaml"])
    assert (cfg["nnodes"], cfg["nproc"], cfg["master_addr"]) == (2, 8, "127.0.0.1")  # the pods pass the real one


# --- the API: a fake server, the real client ------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: object
    content_type: str | None


ROUTE = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/[^/]+/[^/]+(?:/(?P<name>[^/]+))?(?P<log>/log)?$")


class FakeKubeApi:
    """A FAKE Kubernetes API server for tests, not a cluster: an in-process HTTP server that answers the
    namespaced REST paths the executor uses (create, get, list pods by label, pod log, merge patch,
    delete), keeps objects in `objects` by their path, honours dryRun=All, and records every request
    in `requests`. No controller runs: a test sets `status` itself."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

            def do_PATCH(self):
                fake.handle(self, "PATCH")

            def do_DELETE(self):
                fake.handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeKubeApi":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{self.server.server_port}"))

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = dict(parse_qsl(url.query))
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        self.requests.append(Request(method, url.path, query, body, h.headers.get("Content-Type")))
        route = ROUTE.match(url.path)
        if route is None:
            return self.reply(h, 404, status(404, f"no route {url.path}"))
        path, name = url.path, route["name"]
        if route["log"]:
            if path.removesuffix("/log") not in self.objects:
                return self.reply(h, 404, status(404, f'pods "{name}" not found'))
            lines = self.logs.get(name, "").splitlines(keepends=True)
            return self.reply(h, 200, "".join(lines[-int(query.get("tailLines", len(lines))):]), "text/plain")
        if method == "POST":
            key = f"{path}/{body['metadata']['name']}"
            if key in self.objects:
                return self.reply(h, 409, status(409, "already exists", "AlreadyExists"))
            obj = {**body, "metadata": {**body["metadata"], "uid": str(uuid.uuid4()),
                                        "creationTimestamp": "2026-11-29T12:00:00Z"}}
            if query.get("dryRun") != "All":
                self.objects[key] = obj
            return self.reply(h, 201, obj)
        if method == "GET" and name is None:  # a list, by label selector
            want = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
            items = [o for k, o in self.objects.items() if k.rsplit("/", 1)[0] == path
                     and want.items() <= o["metadata"].get("labels", {}).items()]
            return self.reply(h, 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
        if path not in self.objects:
            return self.reply(h, 404, status(404, f'"{name}" not found'))
        if method == "GET":
            return self.reply(h, 200, self.objects[path])
        if method == "PATCH":
            merge(self.objects[path], body)
            return self.reply(h, 200, self.objects[path])
        del self.objects[path]
        return self.reply(h, 200, status(200, "deleted", None))

    @staticmethod
    def reply(h: BaseHTTPRequestHandler, code: int, payload, content_type: str = "application/json") -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def status(code: int, message: str, reason: str | None = "NotFound") -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Success" if code < 400 else "Failure",
            "message": message, "reason": reason, "code": code}


def merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = v


JOB_PATH = f"/apis/batch/v1/namespaces/{NS}/jobs"
PTJ_PATH = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
CM_PATH = f"/api/v1/namespaces/{NS}/configmaps"
POD_PATH = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture
def fake():
    with FakeKubeApi() as api:
        yield api


@pytest.mark.parametrize("case", ["cpu-1node", "gpu-2node"])
def test_start_creates_the_config_then_the_job_and_makes_the_job_own_it(fake, case):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    spec = JOBS[case]
    name = ex.start(spec)
    assert name == spec.id.lower()
    cm, workload = ex.render(spec)
    path = PTJ_PATH if workload["kind"] == "PyTorchJob" else JOB_PATH
    assert fake.calls() == [("POST", CM_PATH), ("POST", path), ("PATCH", f"{CM_PATH}/{name}-config")]
    create_cm, create_job, patch = fake.requests
    assert create_cm.body == cm and create_job.body == workload  # exactly what render() shows
    assert create_cm.query == create_job.query == {}  # no dryRun
    uid = fake.objects[f"{path}/{name}"]["metadata"]["uid"]
    assert patch.body == {"metadata": {"ownerReferences": [
        {"apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": name, "uid": uid}]}}
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert ex.state(name) == "queued"


def test_dry_run_asks_the_server_to_validate_and_keep_nothing(fake):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    for case, path in (("gpu-1node", JOB_PATH), ("gpu-2node", PTJ_PATH)):
        fake.requests.clear()
        name = ex.start(JOBS[case], dry_run=True)
        assert fake.calls() == [("POST", CM_PATH), ("POST", path)]  # no owner patch: nothing was created
        assert all(r.query == {"dryRun": "All"} for r in fake.requests)
        assert fake.objects == {} and ex.state(name) is None


def test_a_failed_create_leaves_no_config_behind(fake):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    ex.start(JOBS["cpu-1node"])
    del fake.objects[f"{CM_PATH}/j-20261129-0001-config"]
    fake.requests.clear()
    with pytest.raises(ApiException) as err:
        ex.start(JOBS["cpu-1node"])  # the Job exists: 409
    assert err.value.status == 409
    assert fake.calls() == [("POST", CM_PATH), ("POST", JOB_PATH), ("DELETE", f"{CM_PATH}/j-20261129-0001-config")]
    assert f"{CM_PATH}/j-20261129-0001-config" not in fake.objects


def test_state_follows_the_job_status(fake):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    name = ex.start(JOBS["gpu-1node"])
    job = fake.objects[f"{JOB_PATH}/{name}"]
    for status_, want in (({}, "queued"),
                          ({"active": 1, "ready": 0}, "queued"),  # pod scheduled, not running yet
                          ({"active": 1, "ready": 1}, "running"),
                          ({"active": 0, "failed": 1, "ready": 0}, "queued"),  # waiting for the retry's pod
                          ({"succeeded": 1, "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                                           {"type": "Complete", "status": "True"}]}, "succeeded"),
                          ({"failed": 4, "conditions": [{"type": "Failed", "status": "True",
                                                         "reason": "BackoffLimitExceeded"}]}, "failed")):
        job["status"] = status_
        assert ex.state(name) == want, status_
    assert fake.requests[-1].method == "GET" and fake.requests[-1].path == f"{JOB_PATH}/{name}"

    name = ex.start(JOBS["gpu-2node"])
    ptj = fake.objects[f"{PTJ_PATH}/{name}"]
    for conditions, want in (([], "queued"),
                             ([("Created", "True")], "queued"),
                             ([("Created", "True"), ("Running", "True")], "running"),
                             ([("Created", "True"), ("Running", "False"), ("Restarting", "True")], "running"),
                             ([("Created", "True"), ("Running", "False"), ("Succeeded", "True")], "succeeded"),
                             ([("Created", "True"), ("Running", "False"), ("Failed", "True")], "failed")):
        ptj["status"] = {"conditions": [{"type": t, "status": s} for t, s in conditions]}
        assert ex.state(name) == want, conditions
    fake.requests.clear()
    assert ex.state("j-nothing") is None
    assert fake.calls() == [("GET", f"{JOB_PATH}/j-nothing"), ("GET", f"{PTJ_PATH}/j-nothing")]


def test_cancel_deletes_in_the_background(fake):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    one, two = ex.start(JOBS["cpu-1node"]), ex.start(JOBS["gpu-2node"])
    fake.requests.clear()
    ex.cancel(one)
    ex.cancel(two)
    assert fake.calls() == [
        ("DELETE", f"{JOB_PATH}/{one}"), ("DELETE", f"{PTJ_PATH}/{one}"), ("DELETE", f"{CM_PATH}/{one}-config"),
        ("DELETE", f"{JOB_PATH}/{two}"), ("DELETE", f"{PTJ_PATH}/{two}"), ("DELETE", f"{CM_PATH}/{two}-config")]
    for r in fake.requests:
        if "/configmaps/" not in r.path:
            assert r.query.get("propagationPolicy") == "Background" or \
                (r.body or {}).get("propagationPolicy") == "Background", r
    assert fake.objects == {} and ex.state(one) is None and ex.state(two) is None
    ex.cancel(one)  # already gone: nothing to do, no error


def test_logs_come_from_the_newest_master_pod(fake):
    ex = KubernetesExecutor(fake.api_client(), namespace=NS)
    name = ex.start(JOBS["gpu-2node"])
    assert ex.logs(name) == ""  # no pod yet

    def pod(pod_name, replica, created):
        fake.objects[f"{POD_PATH}/{pod_name}"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": NS, "creationTimestamp": created,
                         "labels": {"guardtune.io/job": name, "guardtune.io/replica": replica}},
            "spec": {"containers": [{"name": "pytorch", "image": "guardtune:cuda"}]}}
        fake.logs[pod_name] = "".join(f"{pod_name} step {i}\n" for i in range(5))

    pod(f"{name}-master-0-old", "master", "2026-11-29T12:00:00Z")
    pod(f"{name}-master-0", "master", "2026-11-29T12:05:00Z")
    pod(f"{name}-worker-0", "worker", "2026-11-29T12:06:00Z")
    fake.requests.clear()
    assert ex.logs(name, tail=2) == f"{name}-master-0 step 3\n{name}-master-0 step 4\n"
    (listing, read) = fake.requests
    assert (listing.method, listing.path) == ("GET", POD_PATH)
    assert listing.query == {"labelSelector": f"guardtune.io/job={name},guardtune.io/replica=master"}
    assert (read.method, read.path) == ("GET", f"{POD_PATH}/{name}-master-0/log")
    assert read.query == {"container": "pytorch", "tailLines": "2"}


def test_the_platform_queue_runs_a_job_on_kubernetes(fake, tmp_path):
    """The platform's own queue and store over the (fake) cluster: start, follow, lose and start again."""
    from jobs.executors.kubernetes import KubernetesRuns
    from jobs.model import Job
    from jobs.queue import Queue
    from jobs.store import open_store

    runs = KubernetesRuns(KubernetesExecutor(fake.api_client(), namespace=NS, mount_path=str(tmp_path)),
                          tmp_path / "jobs", gpus_per_node=1)
    queue = Queue(open_store(tmp_path / "platform.db"), runs, instance="test", max_running=1)
    cfg = {"task": "sales", "train_file": str(tmp_path / "d.jsonl"), "run_dir": str(tmp_path / "runs" / "j-1"),
           "output_dir": str(tmp_path / "adapters" / "sales-j-1")}
    queue.submit(Job(id="j-20261129-0002", config=cfg, task="sales", estimate_bytes=1 << 30))
    job = queue.store.get("j-20261129-0002")
    assert job.state == "running" and job.handle == "j-20261129-0002", job
    k8s_job = fake.objects[f"{JOB_PATH}/{job.handle}"]
    assert k8s_job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    del fake.objects[f"{JOB_PATH}/{job.handle}"]  # gone from the cluster: the queue starts it again
    queue.tick()
    queue.tick()
    job = queue.store.get(job.id)
    assert job.state == "running" and job.attempts == 2 and f"{JOB_PATH}/{job.handle}" in fake.objects

    fake.objects[f"{JOB_PATH}/{job.handle}"]["status"] = {
        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    queue.tick()
    assert queue.store.get(job.id).state == "succeeded"
