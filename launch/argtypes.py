"""argparse value types shared by the `dualmoe` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_at_least"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` accepting integers >= `minimum`, with a message naming the bad text."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse
