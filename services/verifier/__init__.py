"""The verifier service: `python -m services.verifier --help`."""
