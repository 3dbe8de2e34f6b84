"""`make coverage`'s last step: list every module under the floor and fail if there is one.

    python tests/scripts/coverage_floor.py coverage.json 90
"""

import json
import sys


def main() -> int:
    report, floor = json.load(open(sys.argv[1])), float(sys.argv[2])
    low = {name: f["summary"]["percent_covered"] for name, f in report["files"].items()
           if f["summary"]["num_statements"] and f["summary"]["percent_covered"] < floor}
    for name, percent in sorted(low.items()):
        print(f"coverage: {name} {percent:.1f}% < {floor:g}%", file=sys.stderr)
    total = report["totals"]["percent_covered"]
    print(f"coverage: total {total:.1f}%, {len(low)} module(s) under {floor:g}%", file=sys.stderr)
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
