"""Runs training on a Cloud TPU VM slice: every worker runs the same command; JAX finds the slice.

    python launch/tpu_vm.py --tpu my-v5p-16 --zone us-east5-a --setup \
        --repo https://github.com/ORG/mla_rmt.git --branch main \
        --config configs/rope_budget_sweep.py --workdir gs://BUCKET/sweep --trial 3 \
        -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets

`--setup` first brings the repo to `--branch` on every worker (cloning it, or updating an
existing checkout, discarding local edits) and installs `jax[tpu]` and the package. A `--repo`
that is a local directory is shipped as a git bundle of the branch's last commit. Without
`--trial` the slice runs every trial of the sweep in turn. Add `--dry_run` to print the
commands instead of running them.
"""
import argparse
import os
import re
import shlex
import sys

import _common


def parse(argv):
    own, overrides = _common.split_argv(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tpu", required=True, help="TPU VM name.")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="GCP project (default: gcloud's).")
    p.add_argument("--config", required=True, help="path[:arg], relative to the repo root.")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/... shared by every worker.")
    p.add_argument("--trial", type=int, help="Run only this trial of the sweep.")
    p.add_argument("--setup", action="store_true", help="Clone/update the repo and pip install first.")
    p.add_argument("--repo", default=str(_common.REPO), help="Git URL or local repo directory.")
    p.add_argument("--branch", default="main")
    p.add_argument("--remote_dir", default="mla_rmt", help="Checkout on the workers, relative to ~.")
    p.add_argument("--python", default="python3", help="Python >= 3.11 on the workers (a shell word).")
    p.add_argument("--detach", action="store_true",
                   help="Run under nohup (log: ~/<remote_dir>.log) so that ssh may disconnect.")
    p.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    args = p.parse_args(own)
    if not args.workdir.startswith("gs://"):
        p.error(f"--workdir={args.workdir}: the workers share no disk; use gs://BUCKET/...")
    if args.trial is not None and args.trial < 0:
        p.error("--trial must be >= 0")
    if not re.fullmatch(r"[\w.-]+", args.remote_dir):
        p.error("--remote_dir must be a plain directory name under ~")
    args.overrides = overrides
    return args


def gcloud(args, verb: str, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm <verb> ...` on every worker of the slice."""
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}", *project,
            "--worker=all"]


def setup_commands(args) -> list[list[str]]:
    commands, d = [], args.remote_dir
    source = shlex.quote(args.repo)
    if os.path.isdir(args.repo):          # a local checkout: ship the branch as a git bundle
        bundle = f"/tmp/{d}.bundle"
        commands += [["git", "-C", args.repo, "bundle", "create", bundle, args.branch],
                     gcloud(args, "scp", bundle, f"{args.tpu}:{d}.bundle")]
        source = f"$HOME/{d}.bundle"
    branch = shlex.quote(args.branch)
    script = " && ".join([
        f"{args.python} -c 'import sys; assert sys.version_info >= (3, 11), sys.version'",
        f"git init -q {d}",                # new or existing checkout: fetch, then force the branch
        f"git -C {d} fetch -q {source} {branch}",
        f"git -C {d} checkout -q --force -B {branch} FETCH_HEAD",
        f"{args.python} -m pip install -U 'jax[tpu]'",
        f"{args.python} -m pip install -e ./{d}"])
    return commands + [gcloud(args, "ssh", args.tpu, "--command", script)]


def run_command(args) -> list[str]:
    main = args.python + " " + shlex.join(_common.main_args(
        _common.remote_config(args.config), args.workdir, args.trial, args.overrides))
    script = f"cd {args.remote_dir} && {main}"
    if args.detach:
        script = f"cd {args.remote_dir} && nohup {main} > ~/{args.remote_dir}.log 2>&1 < /dev/null &"
    return gcloud(args, "ssh", args.tpu, "--command", script)


def main(argv):
    args = parse(argv)
    commands = (setup_commands(args) if args.setup else []) + [run_command(args)]
    _common.run(commands, args.dry_run)


if __name__ == "__main__":
    main(sys.argv[1:])
