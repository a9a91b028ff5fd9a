"""`decodekit bench`: the benchmark suite from the command line."""

from __future__ import annotations


def add_bench(sub) -> None:
    from decodekit.bench.run_all import build_parser

    parent = build_parser()
    p = sub.add_parser("bench", help="run the benchmark suite and write bench/results/REPORT.md",
                       parents=[parent], add_help=False, conflict_handler="resolve")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    import sys

    from decodekit.bench.run_all import run

    run(args, command="decodekit bench " + " ".join(sys.argv[2:]))
    return 0
