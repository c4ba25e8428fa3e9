"""Argument types and the parser class shared by every `blockpilot` command group."""

from __future__ import annotations

import argparse
import json
import math

EXIT_USAGE = 2
EXIT_FAILURE = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a multi-line usage on errors; users and scripts want one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def checked_number(text: str, cast: type, noun: str, ok, requirement: str):
    """Parse `text` with `cast` (int or float) and check it with `ok`; the errors name what was
    expected ("expected <noun>") and the rule broken ("must be <requirement>")."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {value if cast is int else repr(text)}")
    return value


def positive_int(text: str) -> int:
    return checked_number(text, int, "an integer", lambda v: v >= 1, ">= 1")


def non_negative_int(text: str) -> int:
    return checked_number(text, int, "an integer", lambda v: v >= 0, ">= 0")


def temperature(text: str) -> float:
    return checked_number(text, float, "a number", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def top_p(text: str) -> float:
    return checked_number(text, float, "a number", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")


def fraction(text: str) -> float:
    return checked_number(text, float, "a number", lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")


def positive_float(text: str) -> float:
    return checked_number(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def json_object(text: str) -> dict:
    """A JSON object given on the command line, e.g. '{"enable_thinking": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


AUTO = "auto"


def block_size_arg(text: str) -> int | str:
    """A block size: a positive integer, or 'auto' (the block-size policy decides)."""
    return AUTO if text.strip().lower() == AUTO else positive_int(text)


def add_client_security_args(parser) -> None:
    """--tls-ca / --tls-cert / --tls-key / --token-file: how a client command reaches a secured server."""
    parser.add_argument("--tls-ca", default="", metavar="FILE", help="PEM CA to trust: connect with TLS ('system': the system's roots)")
    parser.add_argument("--tls-cert", default="", metavar="FILE", help="PEM client certificate (servers that require mTLS)")
    parser.add_argument("--tls-key", default="", metavar="FILE", help="PEM key of --tls-cert")
    parser.add_argument("--token-file", default="", metavar="FILE", help="bearer token to send (the file's first token)")


def client_security(args):
    """The ClientSecurity of the flags added by add_client_security_args."""
    from blockpilot.serving.security import ClientSecurity

    return ClientSecurity(args.tls_ca, args.tls_cert, args.tls_key, args.token_file)
