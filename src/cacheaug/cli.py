"""Command line: `cacheaug <command>`. Each command is a thin wrapper over one library function."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(
        model_name=args.model,
        steps=args.steps,
        seq_len=args.seq_len,
        batch=args.batch,
        n_latents=args.n_latents,
        n_ahead=args.n_ahead,
        n_traces=args.n_traces,
        lr=args.lr,
        out_dir=args.out,
        device=args.device,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheaug", description="Differentiable cache augmentation for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small coprocessor and the pause-token control on built-in text; report, save, reload, generate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--model", default="gemma-3-270m", help="'gemma-3-270m' (offline default) or an HF id / folder")
    demo.add_argument("--steps", type=int, default=30, help="optimizer steps per run (coprocessor, then control)")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (T)")
    demo.add_argument("--batch", type=int, default=2, help="sequences per step")
    demo.add_argument("--n-latents", type=int, default=8, help="N_L latent embeddings per insertion")
    demo.add_argument("--n-ahead", type=int, default=8, help="N_A target tokens per insertion")
    demo.add_argument("--n-traces", type=int, default=8, help="K insertion points per sequence")
    demo.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    demo.add_argument("--out", default="runs/demo", help="output folder (checkpoint + demo.json)")
    demo.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("steps", "seq_len", "batch"):
        if getattr(args, name, 1) < 1:
            sys.exit(f"cacheaug: --{name.replace('_', '-')} must be at least 1")
    args.func(args)


if __name__ == "__main__":
    main()
