"""``python -m profiler.nsys CAPTURE``: analyse an Nsight Systems capture of a deepprof run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from profiler.console import output_dir
from profiler.nsys.api import OUTPUT_FILES, analyze_capture, write_outputs
from profiler.nsys.errors import ProfilerNsysError
from profiler.nsys.tables import render_tables


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m profiler.nsys",
        description="Attribute an Nsight Systems capture of `python -m profiler.layerwise` to "
                    "its NVTX ranges (domain 'deepprof': step > phase > layer direction): CPU "
                    "samples split by native library, CUDA kernels and memcpys joined to the "
                    "range that launched them, time outside our ranges, flame graphs, and the "
                    "agreement with the profiler's own clocks.",
        epilog="Works on captures from nsys 2022.4 and 2025.x. Capture e.g. with: nsys profile "
               "-t nvtx,osrt -s cpu --backtrace=dwarf -o run python -m profiler.layerwise ...")
    parser.add_argument("capture", help="an nsys export (.sqlite) or report (.nsys-rep; "
                                        "exported with nsys, which must then be installed)")
    parser.add_argument("--report", metavar="REPORT_JSON",
                        help="the profiler's report.json of the same run: leaves out its "
                             "warm-up steps and prints the clock agreement")
    parser.add_argument("--out", metavar="DIR", type=output_dir,
                        help=f"write {', '.join(OUTPUT_FILES)} into DIR")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="print tables (default) or the analysis as JSON")
    args = parser.parse_args(argv)
    try:
        analysis = analyze_capture(args.capture, args.report)
    except ProfilerNsysError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_outputs(analysis, args.out)
    if args.format == "json":
        json.dump(analysis, sys.stdout, indent=1)
        print()
    else:
        render_tables(analysis)
        if args.out:
            print(f"wrote {', '.join(OUTPUT_FILES)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
