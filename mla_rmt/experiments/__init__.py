"""Stand-alone experiments: `python -m mla_rmt.experiments.<name> --help`."""
