"""Paste generated result tables into README.md between their markers, so the README's
tables always come from the committed results (results/kv_arith.md, docs/reliability.md).

    python scripts/update_readme.py          # rewrite README.md in place
    python scripts/update_readme.py --check  # exit 1 if README.md is out of date
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {  # marker name -> (file, text pattern selecting what to paste)
    "kv_arith": (ROOT / "results" / "kv_arith.md", None),
    "reliability": (ROOT / "docs" / "reliability.md", r"\| Area \|.*?\*\*Totals:[^\n]*\n[^\n]*\n[^\n]*"),
}


def render(readme: str) -> str:
    for name, (path, pattern) in SECTIONS.items():
        text = path.read_text()
        if pattern:
            m = re.search(pattern, text, re.S)
            if not m:
                raise SystemExit(f"{path}: no text matches {pattern!r}")
            text = m.group(0)
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in readme or end not in readme:
            raise SystemExit(f"README.md lacks the markers {begin} ... {end}")
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{begin}\n_Generated from `{path.relative_to(ROOT)}` by scripts/update_readme.py._\n\n{text.strip()}\n{end}{tail}"
    return readme


def main() -> int:
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in sys.argv:
        if new != old:
            print("README.md is out of date: run python scripts/update_readme.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
