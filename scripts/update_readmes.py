"""Rewrite the results blocks of every README from the committed JSON files.

A lesson README marks a block with ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``;
the block is replaced by the table of ``results/NAME-<gpu>.json`` (the newest such file
if several GPUs were measured). The top-level README's ``<!-- results-summary -->`` block
gets one row per saved report: its headline case (the last one, normally the largest),
our best number, the best peer's, the ratio and the fraction of the measured ceiling.
Tables in READMEs are never written by hand.
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


def latest_reports(lesson: Path) -> list[dict]:
    """The newest JSON of each report name in a lesson's results/."""
    newest: dict[str, Path] = {}
    for f in sorted((lesson / "results").glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and "rows" in data and "name" in data:
            newest[data["name"]] = f
    return [json.loads(f.read_text()) for f in newest.values()]


def summary_row(lesson: str, data: dict) -> str | None:
    rows = [r for r in data["rows"] if r.get("value") is not None]
    if not rows:
        return None
    case = rows[-1]["case"]
    same = [r for r in rows if r["case"] == case]
    ours = max((r for r in same if not r["peer"]), key=lambda r: r["value"], default=None)
    peer = max((r for r in same if r["peer"]), key=lambda r: r["value"], default=None)
    if ours is None:
        return None
    metric, ceil = data["metric"], data.get("ceilings") or {}
    frac = ""
    if metric == "GB/s" and ceil.get("copy_gbps"):
        frac = f"{100 * ours['value'] / ceil['copy_gbps']:.0f}% of copy BW"
    elif metric == "TFLOPS" and ceil.get("bf16_tflops") and \
            str(case.get("dtype", "")).replace("torch.", "") in ("bfloat16", "float16", "bf16", "fp16"):
        frac = f"{100 * ours['value'] / ceil['bf16_tflops']:.0f}% of bf16 matmul"
    case_s = ", ".join(f"{k}={v}" for k, v in case.items())
    peer_s = f"{peer['value']:,.1f} ({peer['impl']})" if peer else "-"
    ratio = f"{ours['value'] / peer['value']:.2f}x" if peer and peer["value"] else "-"
    return (f"| {lesson} | {data['name']} | {case_s} | {ours['value']:,.1f} {metric} "
            f"({ours['impl']}) | {peer_s} | {ratio} | {frac} |")


def render_summary(readme: Path) -> bool:
    lines = ["| lesson | benchmark | headline case | ours | best peer, same run | ratio | "
             "of the measured ceiling |", "|---|---|---|---|---|---|---|"]
    gpus = set()
    for lesson in all_lessons():
        for data in latest_reports(lesson):
            row = summary_row(lesson.name, data)
            if row:
                lines.append(row)
                gpus.add(f"{data['environment'].get('gpu')}, {data['environment']['date'][:10]}")
    text = readme.read_text()
    block = "\n".join(lines) + "\n\nMeasured on: " + "; ".join(sorted(gpus)) + ".\n"
    new = re.sub(r"(<!-- results-summary -->\n).*?(<!-- /results-summary -->)",
                 lambda m: m.group(1) + block + m.group(2), text, flags=re.S)
    if new != text:
        readme.write_text(new)
        return True
    return False


def main():
    for r in [p / "README.md" for p in all_lessons()]:
        if r.exists() and render(r):
            print(f"updated {r}")
    top = Path(__file__).resolve().parents[1] / "README.md"
    if top.exists() and render_summary(top):
        print(f"updated {top}")


if __name__ == "__main__":
    main()
