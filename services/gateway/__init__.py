"""The gateway service: `python -m services.gateway --help`."""
