"""The policy service: `python -m services.policy --help`."""
