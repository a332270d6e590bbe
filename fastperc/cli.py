"""The `fastperc` command: `fastperc info`, `fastperc demo`."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastperc", description="Self-perceptual diffusion training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built kernels and the backend auto picks")
    demo = sub.add_parser("demo", help="one training step with MSE and with the self-perceptual loss, timed")
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import main as info
        info()
    elif args.command == "demo":
        if args.batch_size < 1 or args.repeats < 1:
            print("fastperc demo: --batch-size and --repeats must be >= 1", file=sys.stderr)
            return 2
        from .demo import main as demo
        demo(args.batch_size, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
