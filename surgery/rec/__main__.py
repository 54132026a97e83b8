"""`python -m surgery.rec run JOBDIR`: run or resume a rec training job in this process (the detached launcher
calls this). Exit codes: 0 done or cancelled, 2 bad input, 1 bug."""

from __future__ import annotations

import sys

from surgery.errors import UserError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m surgery.rec run JOBDIR", file=sys.stderr)
        return 2
    from surgery.rec.train import run_rec_job

    try:
        run_rec_job(argv[1])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
