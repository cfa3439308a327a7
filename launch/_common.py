"""What the three launch recipes share: `--` overrides, the main command, trial counting, running.

Not a recipe itself; `python launch/<recipe>.py` finds it beside the recipe.
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(recipe arguments, config overrides): everything after `--` overrides the config.

    An override is `--config.a.b=value` or just `a.b=value`; anything else is an error.
    """
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    overrides = []
    for item in argv[i + 1:]:
        if not item.startswith("--"):
            item = "--config." + item
        if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", item, re.DOTALL):
            sys.exit(f"error: override {item!r} after `--` is not of the form --config.a.b=value")
        overrides.append(item)
    return argv[:i], overrides


def local_config_path(spec: str) -> pathlib.Path | None:
    """The config file of `path[:arg]` on this machine (relative to here or to the repo)."""
    path = pathlib.Path(spec.partition(":")[0])
    for candidate in (path, REPO / path):
        if candidate.is_file():
            return candidate.resolve()
    return None


def remote_config(spec: str) -> str:
    """`path[:arg]` as the remote repo checkout sees it: relative to the repo root."""
    path, sep, arg = spec.partition(":")
    local = local_config_path(spec)
    if local is not None and local.is_relative_to(REPO):
        path = str(local.relative_to(REPO))
    return path + sep + arg


def count_trials(spec: str, python: str = sys.executable) -> int | None:
    """The number of trials the config's sweep declares, or None when it declares no sweep.

    Imports `mla_rmt.sweep.load` (fast, no JAX); where the package cannot be imported here,
    asks `python -m mla_rmt.main --list_trials` instead.
    """
    local = local_config_path(spec)
    if local is None:
        raise FileNotFoundError(f"--config: no file {spec.partition(':')[0]!r} here or in {REPO}")
    local_spec = str(local) + spec[len(spec.partition(":")[0]):]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from mla_rmt import sweep  # pylint: disable=import-outside-toplevel
    except ImportError:
        out = subprocess.run([python, "-m", "mla_rmt.main", f"--config={local_spec}", "--list_trials"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        rows = [line.split("\t") for line in out.splitlines() if re.match(r"\d+\t", line)]
        return None if len(rows) == 1 and rows[0][1] == "." else len(rows)
    declared = sweep.load(local_spec)
    return None if declared is None else len(declared)


def main_args(config: str, workdir: str, trial, overrides: list[str]) -> list[str]:
    """Arguments of `python -m mla_rmt.main ...` after the python; trial may be None."""
    args = ["-m", "mla_rmt.main", f"--config={config}", f"--workdir={workdir}"]
    if trial is not None:
        args.append(f"--trial={trial}")
    return args + overrides


def is_shared_location(workdir: str) -> bool:
    """A URL (gs://...) or an absolute path: what several hosts can all mean the same by."""
    return "://" in workdir or os.path.isabs(workdir)


def run(commands: list[list[str]], dry_run: bool, stdin: str | None = None) -> None:
    """Prints (dry run) or runs each command in turn, stopping at the first that fails."""
    for command in commands:
        if dry_run:
            print(shlex.join(command))
            continue
        print("+", shlex.join(command), file=sys.stderr, flush=True)
        result = subprocess.run(command, input=stdin, text=True, check=False)
        if result.returncode:
            sys.exit(f"error: {shlex.join(command[:4])} ... exited with {result.returncode}")
