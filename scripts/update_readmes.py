"""Rewrite the results blocks of every lesson README from the committed JSON files.

A README marks a block with ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``; the
block is replaced by the table of ``results/NAME-<gpu>.json`` (the newest such file if
several GPUs were measured). Tables in READMEs are never written by hand.
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.lessons import all_lessons  # noqa: E402
from common.results import markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- results:([\w.-]+) -->\n).*?(<!-- /results:\2 -->)", re.S)


def render(readme: Path) -> bool:
    text = readme.read_text()
    results = readme.parent / "results"

    def sub(m):
        name = m.group(2)
        files = sorted(results.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime)
        if not files:
            return m.group(0)
        data = json.loads(files[-1].read_text())
        return m.group(1) + markdown_table(data) + "\n" + m.group(3)

    new = BLOCK.sub(sub, text)
    if new != text:
        readme.write_text(new)
        return True
    return False


def main():
    readmes = [p / "README.md" for p in all_lessons()] + [Path(__file__).resolve().parents[1] / "README.md"]
    for r in readmes:
        if r.exists() and render(r):
            print(f"updated {r}")


if __name__ == "__main__":
    main()
