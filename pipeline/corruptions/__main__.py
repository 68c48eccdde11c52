"""`python -m pipeline.corruptions --markdown`: print the severity table for the docs."""

from __future__ import annotations

import sys

from pipeline.corruptions import list_corruptions, markdown_table


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table() + "\n")
        return 0
    if argv in ([], ["--list"]):
        sys.stdout.write("\n".join(list_corruptions(include_identity=True)) + "\n")
        return 0
    sys.stderr.write("usage: python -m pipeline.corruptions [--markdown | --list]\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
