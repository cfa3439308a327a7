"""Every scalar of a sweep's TensorBoard files, with each trial's result.json and config.json,
as one small gzipped JSON (event files with images and histograms are too big to move around).
Values keep 5 significant digits (far below the spread over seeds), which keeps an
18-trial export small (~2 MB).

    python bench/export_scalars.py WORKDIR OUT.json.gz
    python bench/export_scalars.py --merge OUT.json.gz PART.json.gz [PART.json.gz ...]

`mla_rmt.events.load_export` reads the file back as the tables that
`mla_rmt.events.load_scalars` and `trial_table` give for the workdir itself. --merge joins
the exports of several calls (trials of the same name: the later part wins).
"""
import gzip
import json
import pathlib
import sys

from mla_rmt import events

DIGITS = 5


def _round(value: float) -> float:
    return float(f"{value:.{DIGITS}g}")


def export(workdir: str) -> dict:
    """{trial: {"scalars": {tag: [[step, value], ...]}, "result.json": ..., "config.json": ...}}."""
    trials = {}
    for name, run in events.run_dirs(workdir).items():
        scalars: dict[str, dict[int, float]] = {}
        for tag, step, value in events.read_run(run):       # later files win a step
            scalars.setdefault(tag, {})[step] = _round(value)
        files = {f: json.loads((run / f).read_text()) for f in ("result.json", "config.json")
                 if (run / f).exists()}
        trials[name] = {"scalars": {t: sorted(v.items()) for t, v in scalars.items()}, **files}
    return trials


def _dump(trials: dict, out: str) -> None:
    with gzip.open(out, "wt") as f:
        json.dump(trials, f, separators=(",", ":"))
    print(f"{out}: {len(trials)} trials, {pathlib.Path(out).stat().st_size:,} bytes")


def write(workdir: str, out: str) -> None:
    _dump(export(workdir), out)


def merge(out: str, parts: list[str]) -> None:
    trials = {}
    for part in parts:
        with gzip.open(part, "rt") as f:
            trials.update(json.load(f))
    _dump(dict(sorted(trials.items())), out)


def main():
    if sys.argv[1] == "--merge":
        merge(sys.argv[2], sys.argv[3:])
    else:
        write(*sys.argv[1:3])


if __name__ == "__main__":
    main()
