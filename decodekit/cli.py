"""Command line: ``decodekit generate | models | serve | bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (chat-formatted when the model has a chat template)")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strategy", default=None, help="decoding strategy name (default: plain sampling)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--json", action="store_true", help="print the completion as JSON with usage and stats")
    p.add_argument("--backend", default="hf", choices=["hf", "llamacpp"],
                   help="transformers (hf) or llama.cpp (the GGUF as quantized: pip install 'decodekit[llamacpp]')")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from decodekit.api import LLM

    llm = LLM(args.model, backend=args.backend)
    use_chat = not args.raw and llm.tokenizer.has_chat_template
    prompt = [{"role": "user", "content": args.prompt}] if use_chat else args.prompt
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    if args.stream:
        for event in llm.stream(prompt, strategy=args.strategy, **sampling):
            print(event.text, end="", flush=True)
        print()
        return 0
    completion = llm.generate(prompt, strategy=args.strategy, **sampling)
    if args.json:
        s = completion.stats
        print(json.dumps({"text": completion.text, "finish_reason": completion.finish_reason,
                          "usage": {"prompt_tokens": completion.usage.prompt_tokens,
                                    "completion_tokens": completion.usage.completion_tokens},
                          "stats": {"cached_prompt_tokens": s.cached_prompt_tokens, "forward_passes": s.forward_passes,
                                    "wall_time_s": round(s.wall_time_s, 3), **s.extra}}))
    else:
        print(completion.text)
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list built-in model aliases and whether each is installed")
    p.set_defaults(func=_models)


def _models(args) -> int:
    from decodekit.models import ALIASES, is_installed

    for alias in ALIASES.values():
        state = "installed" if is_installed(alias.name) else f"missing: {alias.install}"
        print(f"{alias.name:14s} {state:40s} {alias.description}")
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure speculation costs for a model on this device and save them "
                                       "where Speculative finds them")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the model loader's choice)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--context", type=int, default=256, help="tokens of context each timed row extends")
    p.add_argument("--reps", type=int, default=5, help="timed rounds (medians); a warm-up round comes first")
    p.add_argument("--output", default=None, help="where to save (default: the path Speculative reads)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (as the server will run); "
                   "llama.cpp's threads with --backend llamacpp")
    p.add_argument("--backend", default="hf", choices=["hf", "llamacpp"], help="transformers (hf) or llama.cpp")
    p.set_defaults(func=_profile)


def _profile(args) -> int:
    from pathlib import Path

    from decodekit.backends.timing import measure_profile
    from decodekit.models import load_backend, load_llamacpp_backend
    from decodekit.profiles import device_of, profile_path

    if args.backend == "llamacpp":
        backend = load_llamacpp_backend(args.model, n_ctx=4 * args.context + 64, n_threads=args.threads)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        backend = load_backend(args.model, dtype=args.dtype, device=args.device, cache_tokens=4 * args.context + 64)
    profile = measure_profile(backend, context=args.context, reps=args.reps,
                              progress=lambda text: print(f"decodekit profile: {text}", file=sys.stderr))
    path = Path(args.output) if args.output else profile_path(backend.name, device_of(backend))
    profile.save(path)
    print(json.dumps({"saved": str(path), "verify_cost": profile.verify_cost,
                      "width_cost": profile.width_cost[:16], "source": profile.source}))
    return 0


COMMANDS = [_add_generate, _add_models, _add_profile]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for add in _optional_commands():
        add(sub)
    return parser


def _optional_commands():
    """Subcommands that live with their feature (server, benchmarks, distillation)."""
    found = []
    for module, attr in [("decodekit.servers.openai.cli", "add_serve"), ("decodekit.bench.cli", "add_bench"),
                         ("decodekit.training.distill", "add_distill"),
                         ("decodekit.training.draft_head", "add_draft_head")]:
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        found.append(getattr(mod, attr))
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"decodekit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
