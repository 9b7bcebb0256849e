"""`cprec` with faults injected through `cprec.runtime.faults` (the one seam), for tests that crash
or slow a job in a child process:

    python tests/fault_cli.py [--kill-after JOB:STEP] [--sleep-each JOB:SECONDS] -- <cprec args>

Also usable as a torchrun script (every rank installs the same faults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, as `-m cprec.cli` has


def main(argv: list[str]) -> int:
    from cprec import cli
    from cprec.runtime import faults

    if "--" not in argv:
        raise SystemExit(
            "usage: fault_cli.py [--kill-after JOB:STEP] [--sleep-each JOB:SECONDS] -- <cprec args>"
        )
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="fault_cli.py")
    p.add_argument("--kill-after", action="append", default=[], metavar="JOB:STEP")
    p.add_argument("--sleep-each", action="append", default=[], metavar="JOB:SECONDS")
    args = p.parse_args(argv[:cut])
    for spec in args.kill_after:
        job, step = spec.split(":")
        faults.install(faults.kill_after(job, int(step)))
    for spec in args.sleep_each:
        job, seconds = spec.split(":")
        faults.install(faults.sleep_each(job, float(seconds)))
    return cli.main(argv[cut + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
