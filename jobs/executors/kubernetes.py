"""Jobs on a Kubernetes cluster: a ConfigMap with the train config, and a batch/v1 Job (one node) or a
Kubeflow Training Operator PyTorchJob (kubeflow.org/v1, Master + Workers) for several nodes.

The objects are built with the official client's typed models (V1Job, V1PodSpec, ...) and serialised
by its ApiClient, so `render()` returns exactly the JSON that `start()` sends. The container runs
`train /config/train.yaml` (the config file is train's positional argument) with the data PVC mounted
at `mount_path` (its working directory): relative data paths in the config resolve there, as they
would beside a config file; the adapter goes to <mount>/adapters/<task> and checkpoints to
<mount>/runs/<name> unless the config names them, and `resume: auto` is forced, so a pod that is
started again continues from the last checkpoint on the volume.

Several nodes: the operator sets MASTER_ADDR (the master's service name), MASTER_PORT (the container
port named `pytorchjob-port`), WORLD_SIZE and RANK in every `pytorch` container; with `nprocPerNode`
left unset WORLD_SIZE counts nodes and RANK is the node's index. Each pod resolves MASTER_ADDR to an
IP (train takes only IPs, see deploy/training/README.md) and runs `train` with nnodes, node_rank,
master_addr and master_port from them; train then starts torchrun with a c10d rendezvous on the master,
one rank per GPU (nproc = gpus_per_node), as for any multi-node run.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from jobs.executors.base import RunState
from jobs.model import Job
from kernel.errors import GuardtuneError
from training.config import TrainConfig, resolve_paths, validate

KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")  # group, version, plural of the PyTorchJob CRD
CONFIG_DIR = "/config"  # where the ConfigMap is mounted; the file is train.yaml
CONFIG_FILE = f"{CONFIG_DIR}/train.yaml"
BACKOFF_LIMIT = 3  # pod retries (Job) or container restarts (PyTorchJob) before the job fails
MASTER_PORT = 29500  # train's default master_port; the operator reads it from the port named below
PORT_NAME = "pytorchjob-port"  # the operator's name for the rendezvous port
LABEL_JOB = "guardtune.io/job"
LABEL_REPLICA = "guardtune.io/replica"  # master (logs come from here) or worker
# Pod names are <name>-worker-<index> under the operator, and its services must be DNS-1035 labels
# (63 characters); 51 leaves room for "-worker-1023".
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,49}[a-z0-9])?$")
# Keys the executor owns: the cluster decides the topology, not a hostfile or a dry run.
REFUSED = ("hostfile", "node_rank", "master_addr", "dry_run")

# The operator's env -> train's keys. MASTER_ADDR is a service name; train wants an IP, and the
# master's own name resolves only once its pod runs, so this waits for it (up to 5 minutes).
NODE_SCRIPT = """\
set -eu
addr=$(python -c '
import socket, sys, time
for _ in range(150):
    try:
        print(socket.gethostbyname(sys.argv[1]))
        break
    except OSError:
        time.sleep(2)
else:
    sys.exit("error: the master address " + sys.argv[1] + " does not resolve")
' "$MASTER_ADDR")
exec train {config} nnodes="$WORLD_SIZE" node_rank="$RANK" master_addr="$addr" master_port="$MASTER_PORT"
"""


@dataclass
class JobSpec:
    id: str  # e.g. "j-20261129-0001", DNS-1123-safe after lowering
    config: dict  # validated train config keys (as `train` takes them in a YAML file)
    nodes: int = 1
    gpus_per_node: int = 0
    memory_bytes: int | None = None  # the estimator's predicted peak; becomes the memory request


class KubernetesExecutor:
    name = "kubernetes"

    def __init__(self, api_client=None, *, namespace="guardtune", image="guardtune:cuda", pvc="guardtune-data",
                 service_account=None, mount_path="/data"):
        self._api_client = api_client  # None: in-cluster config, else ~/.kube/config, on first use
        self.namespace, self.image, self.pvc = namespace, image, pvc
        self.service_account, self.mount_path = service_account, mount_path

    # -- what it would create -------------------------------------------------------------------

    def render(self, job: JobSpec) -> list[dict]:
        """The objects `start` creates, in order, as the JSON the API server receives."""
        serialise = (self._api_client or client.ApiClient()).sanitize_for_serialization
        return [serialise(obj) for obj in self._objects(job)]

    def object_name(self, job: JobSpec) -> str:
        name = job.id.lower()
        if not NAME.match(name):
            raise GuardtuneError(f"job id '{job.id}' cannot name Kubernetes objects: lowercase letters, digits "
                                 "and '-', starting with a letter, ending with a letter or digit, 51 at most")
        return name

    def train_config(self, job: JobSpec) -> dict:
        """The config the pods run: paths on the volume, resume on, the topology from the job spec."""
        if job.nodes < 1 or job.gpus_per_node < 0:
            raise GuardtuneError(f"job {job.id}: nodes must be 1 or more and gpus_per_node 0 or more")
        cfg = _plain(dict(job.config))
        given = [k for k in REFUSED if k in cfg and cfg[k] != _default(k)]  # a default is no request
        if given:
            raise GuardtuneError(f"job {job.id}: {', '.join(given)} cannot be set for a Kubernetes job "
                                 "(the cluster places the nodes)")
        if job.nodes > 1 and cfg.get("launcher") == "deepspeed":
            raise GuardtuneError(f"job {job.id}: launcher deepspeed needs ssh between hosts; "
                                 "a PyTorchJob starts torchrun on every node")
        nproc = job.gpus_per_node or int(cfg.get("nproc") or 1)  # one rank per GPU; CPU jobs keep theirs
        for key, want in (("nnodes", job.nodes), ("nproc", nproc)):
            if cfg.get(key) not in (None, _default(key), want):
                raise GuardtuneError(f"job {job.id}: {key} {cfg[key]} in the config, but the job asks for {want}")
            cfg[key] = want
        mount = PurePosixPath(self.mount_path)
        resolve_paths(cfg, Path(self.mount_path))  # relative data paths: on the volume
        task = str(cfg.get("task") or "default")
        for key, default in (("output_dir", f"adapters/{task}"), ("run_dir", f"runs/{self.object_name(job)}")):
            path = PurePosixPath(posixpath.normpath(mount / str(cfg.get(key) or default)))  # absolute: as it is
            if not path.is_relative_to(mount):
                raise GuardtuneError(f"job {job.id}: {key} {path} is not on the volume ({self.pvc} at {mount}): "
                                     "the pod's own disk goes with the pod")
            cfg[key] = str(path)
        cfg["resume"] = "auto"  # a pod that is started again continues from the last checkpoint
        validate(dict(cfg), source=f"job {job.id}")  # the file must load in train as it is
        return cfg

    def _objects(self, job: JobSpec) -> list:
        name = self.object_name(job)
        cfg = self.train_config(job)
        labels = {"app.kubernetes.io/name": "guardtune", "app.kubernetes.io/component": "train", LABEL_JOB: name}
        config_map = client.V1ConfigMap(
            api_version="v1", kind="ConfigMap",
            metadata=client.V1ObjectMeta(name=f"{name}-config", namespace=self.namespace, labels=labels),
            data={"train.yaml": yaml.safe_dump(cfg, sort_keys=False)})
        meta = client.V1ObjectMeta(name=name, namespace=self.namespace, labels=labels)
        if job.nodes == 1:
            pod = self._pod_template(job, name, labels, "master", container="train",
                                     command=["tini", "--", "train", CONFIG_FILE], restart_policy="Never")
            workload = client.V1Job(api_version="batch/v1", kind="Job", metadata=meta, spec=client.V1JobSpec(
                backoff_limit=BACKOFF_LIMIT, template=pod,
                # An evicted or preempted pod is started again without using up a retry.
                pod_failure_policy=client.V1PodFailurePolicy(rules=[client.V1PodFailurePolicyRule(
                    action="Ignore", on_pod_conditions=[client.V1PodFailurePolicyOnPodConditionsPattern(
                        type="DisruptionTarget", status="True")])])))
            return [config_map, workload]
        # The operator's backoffLimit counts container restarts only under OnFailure (or ExitCode):
        # a failed node restarts in place, rejoins the rendezvous and resumes from the checkpoint.
        script = NODE_SCRIPT.format(config=CONFIG_FILE)
        replicas = {}
        for role, count in (("Master", 1), ("Worker", job.nodes - 1)):
            pod = self._pod_template(job, name, labels, role.lower(), container="pytorch",
                                     command=["tini", "--", "sh", "-c", script],
                                     port=int(cfg.get("master_port") or MASTER_PORT))
            replicas[role] = {"replicas": count, "restartPolicy": "OnFailure", "template": pod}
        workload = {"apiVersion": "/".join(KUBEFLOW[:2]), "kind": "PyTorchJob", "metadata": meta,
                    "spec": {"runPolicy": {"backoffLimit": BACKOFF_LIMIT, "cleanPodPolicy": "None"},
                             "pytorchReplicaSpecs": replicas}}
        return [config_map, workload]

    def _pod_template(self, job: JobSpec, name: str, labels: dict, replica: str, *, container: str,
                      command: list[str], restart_policy: str | None = None,
                      port: int | None = None) -> client.V1PodTemplateSpec:
        requests, limits = {}, {}
        if job.memory_bytes:
            requests["memory"] = f"{math.ceil(job.memory_bytes / 2**20)}Mi"
        if job.gpus_per_node:
            limits["nvidia.com/gpu"] = str(job.gpus_per_node)  # the request follows the limit
        env = [client.V1EnvVar(name="HF_HUB_OFFLINE", value="1"), client.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
        train = client.V1Container(
            name=container, image=self.image, image_pull_policy="IfNotPresent", command=command,
            working_dir=self.mount_path, env=env,
            ports=[client.V1ContainerPort(name=PORT_NAME, container_port=port)] if port else None,
            resources=client.V1ResourceRequirements(requests=requests or None, limits=limits or None),
            security_context=client.V1SecurityContext(allow_privilege_escalation=False,
                                                      capabilities=client.V1Capabilities(drop=["ALL"])),
            volume_mounts=[client.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True),
                           client.V1VolumeMount(name="data", mount_path=self.mount_path),
                           client.V1VolumeMount(name="dshm", mount_path="/dev/shm")])
        spec = client.V1PodSpec(
            restart_policy=restart_policy, service_account_name=self.service_account, containers=[train],
            security_context=client.V1PodSecurityContext(  # the image's user (deploy/docker/Dockerfile.*)
                run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001,
                seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")),
            volumes=[client.V1Volume(name="config", config_map=client.V1ConfigMapVolumeSource(name=f"{name}-config")),
                     client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                         claim_name=self.pvc)),
                     # torch's ranks and NCCL exchange tensors through shared memory; the default is 64 MiB
                     client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory"))])
        return client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={**labels, LABEL_REPLICA: replica}),
                                        spec=spec)

    # -- the cluster ----------------------------------------------------------------------------

    @property
    def api_client(self) -> client.ApiClient:
        if self._api_client is None:
            from kubernetes import config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        return self._api_client

    def start(self, job: JobSpec, *, dry_run: bool = False) -> str:
        """Create the ConfigMap and the Job or PyTorchJob; returns the object name. With dry_run the
        server validates them (dryRun=All) and keeps nothing."""
        config_map, workload = self._objects(job)
        name = workload["metadata"].name if isinstance(workload, dict) else workload.metadata.name
        core, ns = client.CoreV1Api(self.api_client), self.namespace
        dry = "All" if dry_run else None
        core.create_namespaced_config_map(ns, config_map, dry_run=dry)
        try:
            if isinstance(workload, dict):
                workload = self.api_client.sanitize_for_serialization(workload)
                created = client.CustomObjectsApi(self.api_client).create_namespaced_custom_object(
                    *KUBEFLOW[:2], ns, KUBEFLOW[2], workload, dry_run=dry)
                uid, kind, api_version = created["metadata"]["uid"], "PyTorchJob", workload["apiVersion"]
            else:
                created = client.BatchV1Api(self.api_client).create_namespaced_job(ns, workload, dry_run=dry)
                uid, kind, api_version = created.metadata.uid, "Job", "batch/v1"
        except ApiException:
            if not dry_run:
                _ignore_missing(core.delete_namespaced_config_map, config_map.metadata.name, ns)
            raise
        if not dry_run:  # the config goes when the job is deleted (garbage collection)
            owner = {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}
            core.patch_namespaced_config_map(config_map.metadata.name, ns,
                                             {"metadata": {"ownerReferences": [owner]}})
        return name

    def state(self, name: str) -> str | None:
        """queued (no pod running yet), running, succeeded, failed; None when there is no such job."""
        job = _ignore_missing(client.BatchV1Api(self.api_client).read_namespaced_job, name, self.namespace)
        if job is not None:
            return _job_state(job)
        obj = _ignore_missing(client.CustomObjectsApi(self.api_client).get_namespaced_custom_object,
                              *KUBEFLOW[:2], self.namespace, KUBEFLOW[2], name)
        return None if obj is None else _pytorchjob_state(obj)

    def cancel(self, name: str) -> None:
        """Delete the job, its pods (in the background) and its config; nothing there is fine."""
        ns = self.namespace
        _ignore_missing(client.BatchV1Api(self.api_client).delete_namespaced_job, name, ns,
                        propagation_policy="Background")
        _ignore_missing(client.CustomObjectsApi(self.api_client).delete_namespaced_custom_object,
                        *KUBEFLOW[:2], ns, KUBEFLOW[2], name, propagation_policy="Background")
        _ignore_missing(client.CoreV1Api(self.api_client).delete_namespaced_config_map, f"{name}-config", ns)

    def logs(self, name: str, tail: int = 200) -> str:
        """The last `tail` lines of the newest master pod (rank 0 prints the progress); '' before it runs."""
        core = client.CoreV1Api(self.api_client)
        pods = core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL_JOB}={name},{LABEL_REPLICA}=master")
        if not pods.items:
            return ""
        pod = max(pods.items, key=lambda p: str(p.metadata.creation_timestamp or ""))
        container = next((c.name for c in pod.spec.containers if c.name in ("train", "pytorch")),
                         pod.spec.containers[0].name)
        try:
            return core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=container,
                                                tail_lines=tail) or ""
        except ApiException as exc:
            if exc.status == 400:  # the container is still being created
                return ""
            raise


def _job_state(job: client.V1Job) -> str:
    status = job.status or client.V1JobStatus()
    true = {c.type for c in status.conditions or [] if c.status == "True"}
    if true & {"Complete", "SuccessCriteriaMet"}:
        return "succeeded"
    if true & {"Failed", "FailureTarget"}:
        return "failed"
    running = status.ready if status.ready is not None else status.active  # ready: pods past their start
    return "running" if running else "queued"


def _pytorchjob_state(obj: dict) -> str:
    true = {c.get("type") for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}
    if "Succeeded" in true:
        return "succeeded"
    if "Failed" in true:
        return "failed"
    return "running" if true & {"Running", "Restarting"} else "queued"  # Created, Suspended or nothing yet


def _default(key: str) -> Any:
    return TrainConfig.model_fields[key].default


def _ignore_missing(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _plain(value: Any) -> Any:
    """Paths as strings, so the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, PurePath) else value


class KubernetesRuns:
    """The queue's executor interface over KubernetesExecutor: one platform job, one Job or PyTorchJob.

    The volume must be mounted on the platform's host at `mount_path` too (the platform's workdir), so
    the page reads the runs' metrics.jsonl as for local jobs; the log is the master pod's tail."""

    name = "kubernetes"
    admits_by_memory = False  # the cluster's scheduler places the pods by their memory requests

    def __init__(self, k8s: KubernetesExecutor, jobs_dir: Path, *, gpus_per_node: int = 0):
        self.k8s, self.jobs_dir, self.gpus_per_node = k8s, jobs_dir, gpus_per_node

    def spec(self, job: Job) -> JobSpec:
        return JobSpec(id=job.id, config=job.config, nodes=int(job.config.get("nnodes") or 1),
                       gpus_per_node=self.gpus_per_node, memory_bytes=job.estimate_bytes)

    def start(self, job: Job) -> str:
        spec = self.spec(job)
        if job.attempts > 1:
            self.k8s.cancel(self.k8s.object_name(spec))  # what a lost attempt left (its config): start clean
        return self.k8s.start(spec)

    def state(self, job: Job) -> RunState:
        s = self.k8s.state(job.handle) if job.handle else None
        if s is None:
            return RunState("lost")
        return RunState("running" if s in ("queued", "running") else s, exit_code=0 if s == "succeeded" else None)

    def cancel(self, job: Job) -> None:
        if job.handle:
            self.k8s.cancel(job.handle)

    def log_path(self, job: Job) -> Path:
        path = self.jobs_dir / job.id / "log.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if job.handle:
            try:
                path.write_text(self.k8s.logs(job.handle, tail=2000))
            except (ApiException, OSError):
                pass  # the last copy stays
        return path
