"""A trial's checkpoint in the Hugging Face layout: `python -m mla_rmt.export_hf --workdir=DIR --output=OUT`.

mha/gqa become a LLaMA checkpoint, mla_decoupled a DeepSeek-V2 one (mla_rmt/hf_checkpoint.py says
how the layouts correspond). `python -m mla_rmt.analyze --hf=OUT` then gives the numbers that
`--workdir=DIR` gives.
"""
from absl import app, flags

from mla_rmt import hf_checkpoint, trial

_WORKDIR = flags.DEFINE_string("workdir", None, "A trial's directory (holds config.json and checkpoints/).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUTPUT = flags.DEFINE_string("output", None, "The directory to write (config.json, *.safetensors, index).", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _, cfg, params, step = trial.restore(_WORKDIR.value, _STEP.value)
    hf_checkpoint.hf_config_of(cfg)        # fails here, before anything is written, for mla_prerope
    out = hf_checkpoint.export(params, cfg, _OUTPUT.value)
    print(f"step {step} of {_WORKDIR.value} ({cfg.kind}) written to {out}")


if __name__ == "__main__":
    app.run(main)
