"""`python -m pipeline.corruptions --markdown`: print the severity table for the docs
(`--markdown-rgb`: the RGB suite's constant tables)."""

from __future__ import annotations

import sys

from pipeline.corruptions import list_corruptions, markdown_table


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown_table() + "\n")
        return 0
    if argv == ["--markdown-rgb"]:
        from pipeline.corruptions.imagenet_c.markdown import rgb_markdown_table

        sys.stdout.write(rgb_markdown_table() + "\n")
        return 0
    if argv in ([], ["--list"]):
        sys.stdout.write("\n".join(list_corruptions(include_identity=True)) + "\n")
        return 0
    sys.stderr.write("usage: python -m pipeline.corruptions [--markdown | --markdown-rgb | --list]\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
