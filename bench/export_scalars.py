"""Every scalar of a sweep's TensorBoard files, with each trial's result.json, as one small
gzipped JSON (event files with images and histograms are too big to move around).

    python bench/export_scalars.py WORKDIR OUT.json.gz

Needs only tensorboard. `mla_rmt.events.load_export` reads the file back as the tables that
`mla_rmt.events.load_scalars` and `trial_table` give for the workdir itself.
"""
import gzip
import json
import pathlib
import sys

from tensorboard.backend.event_processing import event_accumulator


def export(workdir: str) -> dict:
    root = pathlib.Path(workdir)
    trials = {}
    for run in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        if "checkpoints" in run.parts:
            continue
        scalars: dict[str, dict[int, float]] = {}
        for path in sorted(run.glob("events.out.tfevents.*")):      # later files win a step
            acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                for event in acc.Scalars(tag):
                    scalars.setdefault(tag, {})[event.step] = event.value
        name = run.relative_to(root).as_posix() if run != root else root.name
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
