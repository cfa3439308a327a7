"""Every scalar of a sweep's TensorBoard files, with each trial's result.json, as one small
gzipped JSON (event files with images and histograms are too big to move around).

    python bench/export_scalars.py WORKDIR OUT.json.gz

`mla_rmt.events.load_export` reads the file back as the tables that
`mla_rmt.events.load_scalars` and `trial_table` give for the workdir itself.
"""
import gzip
import json
import pathlib
import sys

from mla_rmt import events


def export(workdir: str) -> dict:
    """{trial: {"scalars": {tag: [[step, value], ...]}, "result.json": ..., "config.json": ...}}."""
    trials = {}
    for name, run in events.run_dirs(workdir).items():
        scalars: dict[str, dict[int, float]] = {}
        for tag, step, value in events.read_run(run):       # later files win a step
            scalars.setdefault(tag, {})[step] = value
        files = {f: json.loads((run / f).read_text()) for f in ("result.json", "config.json")
                 if (run / f).exists()}
        trials[name] = {"scalars": {t: sorted(v.items()) for t, v in scalars.items()}, **files}
    return trials


def write(workdir: str, out: str) -> None:
    with gzip.open(out, "wt") as f:
        json.dump(export(workdir), f)
    print(f"{out}: {pathlib.Path(out).stat().st_size:,} bytes")


def main():
    write(*sys.argv[1:3])


if __name__ == "__main__":
    main()
