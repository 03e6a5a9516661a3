"""Suites that need the server's durable log (--db): restart and durable."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import server_supports


def suite_restart(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    if not server_supports("--db"):
        return "\nrestart: skipped: this server has no --db"
    raise NotImplementedError


def suite_durable(binary: Path, tmp: Path, args: argparse.Namespace) -> str:
    if not server_supports("--db"):
        return "\ndurable: skipped: this server has no --db"
    raise NotImplementedError
