"""The drafter service: `python -m services.drafter --help`."""
