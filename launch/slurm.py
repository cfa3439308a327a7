"""Submits training to a SLURM GPU cluster: one sbatch job array, one array task per sweep trial.

    python launch/slurm.py --nodes 2 --gpus_per_node 8 --mode node --partition gpu \
        --time 24:00:00 --config configs/rope_budget_sweep.py --workdir /shared/runs/sweep

Each array task runs `--trial=$SLURM_ARRAY_TASK_ID` on `--nodes` nodes; srun starts the
processes and jax.distributed reads SLURM's variables. `--mode node`: one process per node
that sees all its GPUs; `--mode gpu`: one process per GPU (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID).
The job runs in this repo checkout (which the nodes must share). Add `--dry_run` to print the
script and the sbatch command instead of writing and submitting them.
"""
import argparse
import os
import re
import shlex
import sys
import tempfile

import _common


def parse(argv):
    own, overrides = _common.split_argv(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, required=True)
    p.add_argument("--mode", choices=["node", "gpu"], required=True,
                   help="One process per node (all its GPUs) or one per GPU.")
    p.add_argument("--partition", required=True)
    p.add_argument("--time", required=True, help="Time limit per trial, e.g. 24:00:00.")
    p.add_argument("--account")
    p.add_argument("--cpus_per_task", type=int)
    p.add_argument("--config", required=True, help="path[:arg], relative to the repo root.")
    p.add_argument("--workdir", required=True, help="Shared directory (or gs://...) for the runs.")
    p.add_argument("--trial", type=int, help="Submit only this trial (no job array).")
    p.add_argument("--max_parallel", type=int, help="At most this many trials at once (array %%N).")
    p.add_argument("--job_name", help="Default: mla_rmt-<config name>.")
    p.add_argument("--script_dir", help="Where the sbatch script and logs go "
                   "(default: the workdir if it is local, else /tmp).")
    p.add_argument("--python", default="python", help="Python on the nodes (a shell word).")
    p.add_argument("--env_setup", default="", help="Shell line run first, e.g. 'source venv/bin/activate'.")
    p.add_argument("--dry_run", action="store_true", help="Print the script and command only.")
    args = p.parse_args(own)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not re.fullmatch(r"(\d+-)?\d+(:\d\d){0,2}|\d+", args.time):
        p.error(f"--time={args.time}: use minutes, HH:MM:SS or D-HH:MM:SS")
    if "://" not in args.workdir:
        args.workdir = os.path.abspath(args.workdir)
    try:
        args.num_trials = _common.count_trials(args.config)
    except Exception as e:  # pylint: disable=broad-except
        p.error(f"--config={args.config}: cannot read its sweep: {e}")
    if args.trial is not None and not 0 <= args.trial < (args.num_trials or 1):
        p.error(f"--trial={args.trial}: the config has {args.num_trials or 1} trial(s)")
    args.job_name = args.job_name or "mla_rmt-" + os.path.basename(args.config.partition(":")[0])[:-3]
    args.script_dir = os.path.abspath(args.script_dir or (
        args.workdir if "://" not in args.workdir else tempfile.gettempdir()))
    args.overrides = overrides
    return args


def sbatch_script(args) -> str:
    array = args.trial is None and args.num_trials is not None
    tasks = 1 if args.mode == "node" else args.gpus_per_node
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                  f"--ntasks-per-node={tasks}", f"--gpus-per-node={args.gpus_per_node}",
                  f"--partition={args.partition}", f"--time={args.time}"]
    directives += [f"--account={args.account}"] if args.account else []
    directives += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    if array:
        limit = f"%{args.max_parallel}" if args.max_parallel else ""
        directives.append(f"--array=0-{args.num_trials - 1}{limit}")
    log = "%x-%A_%a.out" if array else "%x-%j.out"
    directives += [f"--output={os.path.join(args.script_dir, log)}", f"--chdir={_common.REPO}",
                   "--signal=TERM@120",   # SIGTERM 2 min before the limit: checkpoint and stop
                   "--requeue"]           # a preempted task goes back in the queue and resumes

    trial = "$SLURM_ARRAY_TASK_ID" if array else args.trial
    main = args.python + " " + shlex.join(_common.main_args(
        _common.remote_config(args.config), args.workdir, None, []))
    main += f" --trial={trial}" if trial is not None else ""
    main += " " + shlex.join(args.overrides) if args.overrides else ""
    if args.mode == "node":
        # JAX's SLURM detection would give each process only GPU $SLURM_LOCALID; give it all.
        devices = ",".join(map(str, range(args.gpus_per_node)))
        body = [f"export JAX_LOCAL_DEVICE_IDS={devices}", f"srun {main}"]
    else:
        # Each process sees one GPU, which it calls device 0.
        per_task = f"export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID JAX_LOCAL_DEVICE_IDS=0; exec {main}"
        body = [f"srun bash -c {shlex.quote(per_task)}"]
    lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + ["set -eo pipefail"]
    lines += [args.env_setup] if args.env_setup else []
    return "\n".join(lines + body) + "\n"


def main(argv):
    args = parse(argv)
    script = sbatch_script(args)
    path = os.path.join(args.script_dir, f"{args.job_name}.sbatch")
    if args.dry_run:
        print(f"cat > {shlex.quote(path)} <<'EOF'\n{script}EOF")
    else:
        os.makedirs(args.script_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
    _common.run([["sbatch", path]], args.dry_run)


if __name__ == "__main__":
    main(sys.argv[1:])
