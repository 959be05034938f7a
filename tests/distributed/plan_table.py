"""``lorakit plan`` against measured per-rank bytes at 1, 2 and 4 CPU ranks (FSDP2, gloo): the
table in docs/distributed.md. ``python tests/distributed/plan_table.py`` prints it (markdown);
tests/test_plan.py checks the same measurements (2 ranks in CI, 4 slow)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from test_plan import SHAPES, WIDER, measure_ranks  # noqa: E402

MIB = 2**20


def main() -> None:
    rows = ["| shape (hidden, inter, vocab, batch × seq[, base]) | ranks | predicted (MiB) | measured (MiB), "
            "every rank | error | lowest of 6 steps (MiB) | error |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2, 4):
            shapes = (*SHAPES, *(WIDER if world < 4 else WIDER[:1]))  # NF4 needs whole scaler blocks per rank
            for shape, ranks in measure_ranks(world, Path(tmp), shapes).items():
                h, i, v, b, s, *q = shape.split(",")
                predicted = ranks[0]["predicted"]["total"]
                cells = []
                for key in ("measured", "measured_lower"):
                    measured = sorted({m[key] for m in ranks})
                    cells += [" / ".join(f"{m / MIB:.2f}" for m in measured),
                              " / ".join(f"{predicted / m - 1:+.1%}" for m in measured)]
                rows.append(f"| {h}, {i}, {v}, {b} × {s}{', ' + q[0] if q else ''} | {world} | {predicted / MIB:.2f} "
                            f"| {' | '.join(cells)} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
