"""A fixed tiny trial trains to bit-identical losses, gradient norms and spectra.

The reference values were recorded from the trainer as it was before its modules were split
(float32 values as float.hex). A change that reorders or rewrites any arithmetic of the step,
the loss, the optimizer, the diagnostics or the loop's bookkeeping fails here; a change that
only moves code does not. Values depend on the XLA CPU backend: regenerate them with
`PYTHONPATH=. python tests/test_golden.py` only where a change of numerics is intended.
"""
import pathlib

import numpy as np
import pytest
from conftest import read_scalars

from mla_rmt import presets, train

# One kind with decoupled RoPE branches (a sampled null) and one plain kind.
KINDS = ("mla_decoupled", "mha")


def _config(kind):
    config = presets.apply_model_preset(presets.base_config(), "tiny")
    config.model.attention.kind = kind
    config.data.seq_len, config.data.global_batch_size = 32, 8
    t = config.train
    t.num_steps, t.log_every, t.eval_every, t.eval_batches, t.checkpoint_every = 6, 1, 3, 2, 6
    config.diagnostics.every = 2              # spectra of the params after steps 0, 2, 4
    config.diagnostics.activations_every = 3
    return config


def _selected(scalars):
    """A handful of each kind: every step's loss and grad norm, eval loss, probes of layer 0,
    and the largest eigenvalue, stable rank and MP gap of every analysed matrix."""
    keep = {}
    for tag, values in scalars.items():
        metric = tag.split("/")[2] if tag.startswith("spectral/") else ""
        if (tag in ("train/loss", "train/grad_norm", "train/learning_rate", "eval/loss")
                or (tag.startswith("activations/") and tag.endswith("layer_00"))
                or (metric in ("lambda_max", "stable_rank", "mp_gap") and tag.endswith("/mean"))):
            keep[tag] = {step: np.float32(v).item().hex() for step, v in sorted(values.items())}
    return keep


def _train(kind, workdir):
    result = train.train_and_evaluate(_config(kind), str(workdir))
    assert result.status == "finished" and result.step == 6
    return _selected(read_scalars(workdir))


@pytest.mark.parametrize("kind", KINDS)
def test_a_fixed_tiny_trial_trains_to_the_recorded_values(kind, tmp_path):
    got = _train(kind, tmp_path)
    assert set(got) == set(GOLDEN[kind]), sorted(set(got) ^ set(GOLDEN[kind]))
    mismatched = {tag: (got[tag], GOLDEN[kind][tag]) for tag in got if got[tag] != GOLDEN[kind][tag]}
    assert not mismatched, mismatched


GOLDEN = {
    'mla_decoupled': {
        'spectral/qk_circuit/mp_gap/head_mean/mean': {
            0: '0x1.1ce9e00000000p-7',
            2: '0x1.1cba600000000p-7',
            4: '0x1.1d88300000000p-7',
        },
        'spectral/qk_circuit/stable_rank/head_mean/mean': {
            0: '0x1.6aa7440000000p+3',
            2: '0x1.6aa2720000000p+3',
            4: '0x1.6a8cc40000000p+3',
        },
        'spectral/qk_circuit/lambda_max/head_mean/mean': {
            0: '0x1.6a50d20000000p+1',
            2: '0x1.6a51580000000p+1',
            4: '0x1.6a57500000000p+1',
        },
        'spectral/qk_circuit_sum/mp_gap/mean': {
            0: '0x0.0p+0',
            2: '0x0.0p+0',
            4: '0x0.0p+0',
        },
        'spectral/qk_circuit_sum/stable_rank/mean': {
            0: '0x1.7f98440000000p+3',
            2: '0x1.7f90140000000p+3',
            4: '0x1.7f6ce20000000p+3',
        },
        'spectral/qk_circuit_sum/lambda_max/mean': {
            0: '0x1.51d3a80000000p-11',
            2: '0x1.51d7080000000p-11',
            4: '0x1.51e89e0000000p-11',
        },
        'train/grad_norm': {
            1: '0x1.2daa280000000p+1',
            2: '0x1.2c2e180000000p+1',
            3: '0x1.274e700000000p+1',
            4: '0x1.3567360000000p+1',
            5: '0x1.33d7c40000000p+1',
            6: '0x1.2268480000000p+1',
        },
        'train/learning_rate': {
            1: '0x0.0p+0',
            2: '0x1.f750e60000000p-15',
            3: '0x1.f751160000000p-14',
            4: '0x1.797cc40000000p-13',
            5: '0x1.f750fe0000000p-13',
            6: '0x1.3a92a80000000p-12',
        },
        'train/loss': {
            1: '0x1.0744f40000000p+3',
            2: '0x1.03984a0000000p+3',
            3: '0x1.039c2a0000000p+3',
            4: '0x1.035a980000000p+3',
            5: '0x1.02c1100000000p+3',
            6: '0x1.ffc0e60000000p+2',
        },
        'activations/attn_entropy_bits/layer_00': {
            3: '0x1.9573f40000000p+1',
            6: '0x1.956e840000000p+1',
        },
        'activations/attn_sigma1/layer_00': {
            3: '0x1.95af200000000p+0',
            6: '0x1.959be20000000p+0',
        },
        'activations/attn_sigma2/layer_00': {
            3: '0x1.11e12e0000000p+0',
            6: '0x1.11f05e0000000p+0',
        },
        'activations/attn_sigma_ratio/layer_00': {
            3: '0x1.7b332e0000000p+0',
            6: '0x1.7b0c2c0000000p+0',
        },
        'activations/rep_stable_rank/layer_00': {
            3: '0x1.c2c0fe0000000p+1',
            6: '0x1.c256b40000000p+1',
        },
        'eval/loss': {
            3: '0x1.03654a0000000p+3',
            6: '0x1.fca7e80000000p+2',
        },
    },
    'mha': {
        'spectral/qk_circuit/mp_gap/head_mean/mean': {
            0: '0x1.8c42800000000p-6',
            2: '0x1.8bbea00000000p-6',
            4: '0x1.89ddb00000000p-6',
        },
        'spectral/qk_circuit/stable_rank/head_mean/mean': {
            0: '0x1.707aa60000000p+3',
            2: '0x1.707c0c0000000p+3',
            4: '0x1.7087080000000p+3',
        },
        'spectral/qk_circuit/lambda_max/head_mean/mean': {
            0: '0x1.6a9ae80000000p+1',
            2: '0x1.6a96fa0000000p+1',
            4: '0x1.6a810a0000000p+1',
        },
        'spectral/qk_circuit_sum/mp_gap/mean': {
            0: '0x1.810f600000000p-6',
            2: '0x1.8265800000000p-6',
            4: '0x1.800c800000000p-6',
        },
        'spectral/qk_circuit_sum/stable_rank/mean': {
            0: '0x1.3901820000000p+4',
            2: '0x1.390ab40000000p+4',
            4: '0x1.3923400000000p+4',
        },
        'spectral/qk_circuit_sum/lambda_max/mean': {
            0: '0x1.ab0a280000000p-12',
            2: '0x1.aafa740000000p-12',
            4: '0x1.aac8900000000p-12',
        },
        'train/grad_norm': {
            1: '0x1.2706b80000000p+1',
            2: '0x1.24cbaa0000000p+1',
            3: '0x1.18ad220000000p+1',
            4: '0x1.29389c0000000p+1',
            5: '0x1.20396c0000000p+1',
            6: '0x1.1be73e0000000p+1',
        },
        'train/learning_rate': {
            1: '0x0.0p+0',
            2: '0x1.f750e60000000p-15',
            3: '0x1.f751160000000p-14',
            4: '0x1.797cc40000000p-13',
            5: '0x1.f750fe0000000p-13',
            6: '0x1.3a92a80000000p-12',
        },
        'train/loss': {
            1: '0x1.03e24c0000000p+3',
            2: '0x1.01c99e0000000p+3',
            3: '0x1.059d520000000p+3',
            4: '0x1.01ef300000000p+3',
            5: '0x1.00e95e0000000p+3',
            6: '0x1.fd70ea0000000p+2',
        },
        'activations/attn_entropy_bits/layer_00': {
            3: '0x1.909a780000000p+1',
            6: '0x1.909d720000000p+1',
        },
        'activations/attn_sigma1/layer_00': {
            3: '0x1.9417e20000000p+0',
            6: '0x1.9406220000000p+0',
        },
        'activations/attn_sigma2/layer_00': {
            3: '0x1.0e89940000000p+0',
            6: '0x1.0e866e0000000p+0',
        },
        'activations/attn_sigma_ratio/layer_00': {
            3: '0x1.7e61140000000p+0',
            6: '0x1.7e54bc0000000p+0',
        },
        'activations/rep_stable_rank/layer_00': {
            3: '0x1.b64b380000000p+1',
            6: '0x1.b611480000000p+1',
        },
        'eval/loss': {
            3: '0x1.0202ce0000000p+3',
            6: '0x1.fa28dc0000000p+2',
        },
    },
}


if __name__ == "__main__":
    import os
    import tempfile
    os.environ.setdefault("MLA_RMT_CACHE", tempfile.mkdtemp())
    recorded = {kind: _train(kind, pathlib.Path(tempfile.mkdtemp())) for kind in KINDS}
    path = pathlib.Path(__file__)
    text = path.read_text()
    head = text[:text.index("GOLDEN = ")]
    tail = text[text.index('\n\nif __name__ == "__main__":'):]
    lines = ["GOLDEN = {"]
    for kind, tags in recorded.items():
        lines.append(f"    {kind!r}: {{")
        for tag, values in tags.items():
            lines.append(f"        {tag!r}: {{")
            lines += [f"            {step}: {v!r}," for step, v in values.items()]
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    path.write_text(head + "\n".join(lines) + "\n" + tail)
