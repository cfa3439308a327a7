"""Runs training on GKE: one JobSet (jobset.x-k8s.io/v1alpha2) per sweep trial, one pod per host.

    python launch/gke.py --accelerator tpu --tpu_type v5p-16 --tpu_topology 2x2x2 \
        --image us-docker.pkg.dev/PROJECT/REPO/mla_rmt:latest \
        --config configs/rope_budget_sweep.py --workdir gs://BUCKET/sweep

The image must hold the repo at its working directory with the package installed. Pods find
process 0 through the JobSet's headless service: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (the pod's completion index) start jax.distributed. The manifests are YAML from
a small built-in emitter (no PyYAML needed). Add `--dry_run` to print them and the kubectl
command instead of applying them.
"""
import argparse
import json
import math
import re
import sys

import _common

# TPU name prefix: (GKE accelerator label, TensorCores per chip as counted in the name).
TPU_GENERATIONS = {"v4": ("tpu-v4-podslice", 2), "v5p": ("tpu-v5p-slice", 2),
                   "v5litepod": ("tpu-v5-lite-podslice", 1), "v5e": ("tpu-v5-lite-podslice", 1),
                   "v6e": ("tpu-v6e-slice", 1)}
JOB = "workers"      # the replicated job's name, part of every pod's DNS name


def parse(argv):
    own, overrides = _common.split_argv(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accelerator", choices=["tpu", "gpu"], required=True)
    p.add_argument("--tpu_type", help="e.g. v5p-16, v4-32, v5litepod-16, v6e-16.")
    p.add_argument("--tpu_topology", help="e.g. 2x2x2 (the slice's chips).")
    p.add_argument("--gpus_per_host", type=int, default=8)
    p.add_argument("--gpu_type", help="Optional cloud.google.com/gke-accelerator, e.g. nvidia-h100-80gb.")
    p.add_argument("--num_hosts", type=int,
                   help="Pods = hosts (default: TPU chips / 4, at least 1; GPU 1).")
    p.add_argument("--image", required=True)
    p.add_argument("--config", required=True, help="path[:arg], relative to the image's working dir.")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/... shared by every pod.")
    p.add_argument("--trial", type=int, help="Only this trial (default: one JobSet per trial).")
    p.add_argument("--name", default="mla-rmt", help="JobSet name (prefix, with -t<trial>).")
    p.add_argument("--port", type=int, default=1234, help="Coordinator port.")
    p.add_argument("--max_restarts", type=int, default=3,
                   help="JobSet restarts after a pod fails or is preempted (each resumes).")
    p.add_argument("--python", default="python")
    p.add_argument("--dry_run", action="store_true", help="Print the manifests and command only.")
    args = p.parse_args(own)
    if not _common.is_shared_location(args.workdir):
        p.error(f"--workdir={args.workdir}: pods share no disk; use gs://BUCKET/... "
                "(or an absolute path on a volume every pod mounts)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,30}[a-z0-9])?", args.name):
        p.error(f"--name={args.name}: lowercase letters, digits and '-', at most 32")
    if args.accelerator == "tpu":
        tpu_shape(p, args)
    else:
        args.num_hosts = args.num_hosts or 1
        if args.gpus_per_host < 1:
            p.error("--gpus_per_host must be >= 1")
    if args.num_hosts < 1:
        p.error("--num_hosts must be >= 1")
    try:
        args.num_trials = _common.count_trials(args.config)
    except Exception as e:  # pylint: disable=broad-except
        p.error(f"--config={args.config}: cannot read its sweep: {e}")
    if args.trial is not None and not 0 <= args.trial < (args.num_trials or 1):
        p.error(f"--trial={args.trial}: the config has {args.num_trials or 1} trial(s)")
    args.overrides = overrides
    return args


def tpu_shape(p, args) -> None:
    """Checks --tpu_type against --tpu_topology; sets the accelerator label and chips per host."""
    if not args.tpu_type or not args.tpu_topology:
        p.error("--accelerator tpu needs --tpu_type and --tpu_topology")
    generation, _, count = args.tpu_type.partition("-")
    if generation not in TPU_GENERATIONS or not count.isdigit():
        p.error(f"--tpu_type={args.tpu_type}: expected <{'|'.join(TPU_GENERATIONS)}>-<count>")
    if not re.fullmatch(r"\d+(x\d+){1,2}", args.tpu_topology):
        p.error(f"--tpu_topology={args.tpu_topology}: expected e.g. 2x2x2 or 4x4")
    args.tpu_label, cores_per_chip = TPU_GENERATIONS[generation]
    chips = math.prod(int(n) for n in args.tpu_topology.split("x"))
    if int(count) != chips * cores_per_chip:
        p.error(f"--tpu_type={args.tpu_type} does not match --tpu_topology={args.tpu_topology} "
                f"({chips} chips = {generation}-{chips * cores_per_chip})")
    args.num_hosts = args.num_hosts or max(1, chips // 4)
    if chips % args.num_hosts:
        p.error(f"--num_hosts={args.num_hosts} does not divide the slice's {chips} chips")
    args.chips_per_host = chips // args.num_hosts


def jobset(args, trial) -> dict:
    name = args.name if trial is None else f"{args.name}-t{trial}"
    if args.accelerator == "tpu":
        node_selector = {"cloud.google.com/gke-tpu-accelerator": args.tpu_label,
                         "cloud.google.com/gke-tpu-topology": args.tpu_topology}
        limits = {"google.com/tpu": args.chips_per_host}
        # All pods of the job on one node pool, i.e. one slice.
        annotations = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    else:
        node_selector = {"cloud.google.com/gke-accelerator": args.gpu_type} if args.gpu_type else {}
        limits = {"nvidia.com/gpu": args.gpus_per_host}
        annotations = {}
    env = [{"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-{JOB}-0-0.{name}:{args.port}"},
           {"name": "JAX_NUM_PROCESSES", "value": str(args.num_hosts)},
           {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {
               "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
    container = {"name": "main", "image": args.image,
                 "command": [args.python, *_common.main_args(
                     _common.remote_config(args.config), args.workdir, trial, args.overrides)],
                 "ports": [{"containerPort": args.port}], "env": env,
                 "resources": {"limits": limits}}
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 120,
           **({"nodeSelector": node_selector} if node_selector else {}),
           "containers": [container]}
    job = {"parallelism": args.num_hosts, "completions": args.num_hosts,
           "completionMode": "Indexed", "backoffLimit": 0, "template": {"spec": pod}}
    metadata = {"name": name, **({"annotations": annotations} if annotations else {})}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
            "spec": {"network": {"enableDNSHostnames": True},
                     "failurePolicy": {"maxRestarts": args.max_restarts},
                     "replicatedJobs": [{"name": JOB, "replicas": 1, "template": {"spec": job}}]}}


_PLAIN = re.compile(r"[A-Za-z_][\w./-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)          # only ever empty here
    s = str(value)
    return s if _PLAIN.fullmatch(s) and s.lower() not in _YAML_WORDS else json.dumps(s)


def to_yaml(value, indent: str = "") -> str:
    """Block YAML of dicts, lists, strings, numbers and booleans (strings quoted as JSON)."""
    lines = []
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        head = f"{indent}{_scalar(key)}:" if isinstance(value, dict) else f"{indent}-"
        if isinstance(item, (dict, list)) and item:
            if isinstance(value, list) and isinstance(item, dict):   # "- key: ..." on one line
                inner = to_yaml(item, indent + "  ").rstrip("\n")
                lines.append(f"{head} {inner[len(indent) + 2:]}")
                continue
            lines.append(head)
            lines.append(to_yaml(item, indent + "  ").rstrip("\n"))
        else:
            lines.append(f"{head} {_scalar(item)}")
    return "\n".join(lines) + "\n"


def main(argv):
    args = parse(argv)
    if args.trial is not None or args.num_trials is None:
        trials = [args.trial]
    else:
        trials = list(range(args.num_trials))
    manifest = "---\n".join(to_yaml(jobset(args, trial)) for trial in trials)
    command = ["kubectl", "apply", "-f", "-"]
    if args.dry_run:
        print(f"{' '.join(command)} <<'EOF'\n{manifest}EOF")
    else:
        _common.run([command], False, stdin=manifest)


if __name__ == "__main__":
    main(sys.argv[1:])
