"""The README's main job learns: a trial of the tiny sweep, at its real size, ends at least
1 nat below the unigram entropy of the held-out text (the best context-free model)."""
import json
import subprocess
import sys

import numpy as np
from conftest import REPO, step_bound_env
from mla_rmt import data, tokenizer


def unigram_entropy(config, tok, split: str) -> float:
    """Entropy in nats of the split's token distribution, each document followed by EOS."""
    ids = np.concatenate([tok.encode(t) + [tok.eos_id()] for t in data.iter_texts(config.data, split)])
    p = np.unique(ids, return_counts=True)[1] / ids.size
    return float(-(p * np.log(p)).sum())


def test_tiny_sweep_trial_beats_unigram_entropy_by_one_nat(tmp_path):
    command = [sys.executable, "-m", "mla_rmt.main",
               f"--config={REPO / 'configs/rope_budget_sweep.py'}:tiny", f"--workdir={tmp_path}",
               "--trial=1"]                     # mha, rope_fraction 0.5, exactly as the README runs it
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=step_bound_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    result = json.loads((trial / "result.json").read_text())

    sys.path.insert(0, str(REPO))
    from configs import rope_budget_sweep  # pylint: disable=import-outside-toplevel
    config = rope_budget_sweep.get_config("tiny")
    tok = tokenizer.get_tokenizer(config.data, config.model.vocab_size)
    baseline = unigram_entropy(config, tok, "validation")
    assert 5.0 < baseline < 7.0                 # a real English corpus with a 2048-piece vocabulary
    assert result["step"] == config.train.num_steps
    assert result["eval/loss"] <= baseline - 1.0, (result["eval/loss"], baseline)
