"""``python -m decodekit.servers.openai [serve options]`` is ``decodekit serve``."""

import argparse
import sys

from decodekit.servers.openai.cli import add_serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m decodekit.servers.openai")
    add_serve(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    sys.exit(args.func(args))
