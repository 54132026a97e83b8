"""TUI start-up: time from launch to the first painted model table on the demo model, against `workbench inspect`
alone, both measured in this run (medians of N fresh processes).

Run: python benchmarks/tui_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

APP = """
import asyncio, time
from workbench.app import WorkbenchApp
async def main():
    app = WorkbenchApp("smollm2-135m", load_weights=False)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.first_paint is None:
            await pilot.pause(0.005)
        await pilot.pause()
        print(time.time())  # wall clock at the first painted table; the parent knows when it launched us
asyncio.run(main())
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    subprocess.run([sys.executable, "-c", "from surgery.sources import resolve_source as r; r('smollm2-135m')"],
                   check=True)  # fetched and converted once, outside the timing
    inspect, tui = [], []
    for _ in range(args.repeats):
        inspect.append(timed([sys.executable, "-c", "from workbench.cli import main; main()", "inspect",
                              "smollm2-135m"]))
        launched = time.time()
        out = subprocess.run([sys.executable, "-c", APP], check=True, capture_output=True, text=True)
        tui.append(float(out.stdout.strip().splitlines()[-1]) - launched)
    i, t = statistics.median(inspect), statistics.median(tui)
    print(f"workbench inspect (process, median of {args.repeats}): {i:.2f}s  [{min(inspect):.2f}-{max(inspect):.2f}]")
    print(f"TUI launch -> model table painted:                {t:.2f}s  [{min(tui):.2f}-{max(tui):.2f}]")
    print(f"ratio TUI / inspect: {t / i:.2f}")


if __name__ == "__main__":
    main()
