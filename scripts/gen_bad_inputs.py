"""Regenerate docs/bad-inputs.md from the cases in tests/test_bad_input.py."""

import pathlib
import sys
import tempfile

root = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(root / "tests"))
import test_bad_input as cases  # noqa: E402

doc = root / "docs" / "bad-inputs.md"
head, _, rest = doc.read_text().partition("| case | input | error |")
tail = rest[rest.index("\n## "):] if "\n## " in rest else ""  # later sections (## Command line) stay
rows = []
for cid, what, action, _, _ in cases.CASES:
    with tempfile.TemporaryDirectory() as d:
        try:
            action(cases.model(), pathlib.Path(d))
            msg = "NO ERROR"
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".replace(d, "CKPT").replace("|", "\\|")
    rows.append(f"| `{cid}` | {what} | {msg} |")
doc.write_text(head + "| case | input | error |\n|---|---|---|\n" + "\n".join(rows) + "\n" + tail)
print(f"wrote {len(rows)} rows to {doc}")
