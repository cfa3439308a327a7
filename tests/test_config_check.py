"""mla_rmt/config_check.py: a bad field fails before anything compiles, naming the field."""
import pytest

from mla_rmt import config_check, presets
from mla_rmt.model_config import ConfigError


def test_train_config_errors_name_the_field():
    config = presets.base_config()
    config.train.num_steps = 0
    with pytest.raises(ConfigError, match="config.train.num_steps"):
        config_check.validate(config)


@pytest.mark.parametrize("field, value", [("microbatch_size", 5), ("microbatch_size", -1),
                                          ("loss_chunk_tokens", -2)])
def test_train_step_settings_errors_name_the_field(field, value):
    config = presets.base_config()
    config.data.global_batch_size = 32
    config.train[field] = value
    with pytest.raises(ConfigError, match=f"config.train.{field}"):
        config_check.validate(config)


@pytest.mark.parametrize("field, value", [
    ("data.seq_len", 0), ("data.global_batch_size", -8), ("optim.learning_rate", 0.0),
    ("train.peak_flops_per_device", -1.0), ("diagnostics.every", -1),
    ("diagnostics.images_every", 3), ("diagnostics.activations_every", -1),
    ("diagnostics.probe_batch", 0), ("model.attention.kind", "no_such_kind"),
])
def test_every_section_is_checked_naming_the_field(field, value):
    config = presets.base_config()
    config.diagnostics.every = 2          # images_every must be a multiple of it
    section, name = field.rsplit(".", 1)
    node = config
    for part in section.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError, match=f"config.{field}:"):
        config_check.validate(config)
    config_check.validate(presets.base_config())     # the defaults pass


def test_validate_knows_every_kind_in_a_fresh_interpreter():
    """The kinds register their checks when mla_rmt.attention is imported; validate must not
    depend on an earlier import of it (this process has one, so a new interpreter runs it)."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    code = ("from mla_rmt import config_check, presets\n"
            "for kind in ('mha', 'gqa', 'mla_prerope', 'mla_decoupled'):\n"
            "    config = presets.base_config()\n"
            "    config.model.attention.kind = kind\n"
            "    assert config_check.validate(config).kind == kind\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
