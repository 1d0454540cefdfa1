"""Fault drills: real processes on loopback, one row each, non-zero exit on any loss.

    .venv/bin/python -m bench.drills [--list] [NAME ...]      # from the repository root; all drills by default

Each module ``bench/drills/<area>.py`` exports ``DRILLS``: name -> function returning a :class:`Row` (what was tried,
how many faults were injected and survived, how many inputs were tried, tokens lost, a free-text note). A drill
that loses anything sets ``lost > 0`` (or raises); the runner prints the table and exits 1. Drills are kept out of
CI: they take minutes each and load the machine.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: bench.*, tests.* importable

from bench._common import load_average, machine_line, quiet, table  # noqa: E402
from bench.drills.row import Row  # noqa: E402


def all_drills() -> dict[str, object]:
    found: dict[str, object] = {}
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name.startswith("_") or mod.name == "row":
            continue
        found.update(importlib.import_module(f"bench.drills.{mod.name}").DRILLS)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.drills", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="drills to run (default: all)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    quiet()
    drills = all_drills()
    if args.list:
        print("\n".join(sorted(drills)))
        return 0
    unknown = set(args.names) - set(drills)
    if unknown:
        print(f"unknown drills {sorted(unknown)}; known: {sorted(drills)}", file=sys.stderr)
        return 2
    print(machine_line(threads=1))
    rows, failed = [], False
    for name in args.names or sorted(drills):
        t0 = time.monotonic()
        try:
            row = drills[name]()
        except Exception as e:  # a drill that breaks is a failed drill, not a crashed runner
            traceback.print_exc()
            row = Row(tried=0, faults=0, survived=0, inputs=0, lost=-1, note=f"raised {type(e).__name__}: {e}")
        failed |= row.lost != 0 or row.survived < row.faults
        rows.append([name, row.tried, f"{row.survived}/{row.faults}", row.inputs, row.lost,
                     f"{time.monotonic() - t0:.0f}", row.note])
        print(table(["drill", "runs", "faults survived", "inputs", "tokens lost", "s", "note"], rows[-1:]), flush=True)
    print()
    print(table(["drill", "runs", "faults survived", "inputs", "tokens lost", "s", "note"], rows))
    print(f"load average at end {load_average()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
