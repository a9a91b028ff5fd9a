"""``decodekit serve``: the OpenAI-compatible local server (found by decodekit/cli.py)."""

from __future__ import annotations

import os


def add_serve(sub) -> None:
    from decodekit.servers.openai.limits import Limits

    p = sub.add_parser("serve", help="OpenAI-compatible local server with continuous batching")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DECODEKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DECODEKIT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: --model)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for admission before 429")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together per step")
    p.add_argument("--cache-tokens", type=int, default=16384, help="KV-cache budget in tokens")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat max_tokens when the client sets none")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the hf backend, bfloat16 on vllm")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm", "llamacpp"],
                   help="transformers (hf), vLLM, or llama.cpp (a GGUF model as quantized)")
    p.add_argument("--engine-args", default="{}", help='engine arguments as JSON: vLLM\'s (--backend vllm), e.g. '
                   '\'{"tensor_parallel_size": 2, "max_model_len": 4096}\', or llama.cpp\'s (--backend llamacpp): '
                   '\'{"n_ctx": 8192, "n_gpu_layers": 0}\'')
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                   "llama.cpp's threads with --backend llamacpp (default: the CPU cores)")
    p.add_argument("--draft-model", action="append", default=[], metavar="NAME",
                   help="a draft model requests may name (decodekit.draft); loaded at start, repeatable")
    p.add_argument("--small-model", default=None, metavar="NAME",
                   help="the small model of entropy switching (decodekit.strategy 'entropy'); loaded at start")
    p.add_argument("--allow-models", default="", metavar="A,B",
                   help="more models requests may name as a draft or second model; loaded at start")
    p.add_argument("--metrics-auth", action="store_true", help="/metrics needs the API key too")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="request body limit (413)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"decodekit serve needs {', '.join(missing)}: pip install 'decodekit[server]'")
    import uvicorn
    from decodekit.servers.openai.app import create_app
    from decodekit.servers.openai.limits import Limits

    from decodekit.api import LLM
    from decodekit.models import load_backend, load_llamacpp_backend

    llama = args.backend == "llamacpp"
    if args.threads and not llama:
        import torch

        torch.set_num_threads(args.threads)
    import json

    engine_args = json.loads(args.engine_args)
    if not isinstance(engine_args, dict) or (engine_args and args.backend == "hf"):
        raise ValueError("--engine-args must be a JSON object and needs --backend vllm or llamacpp")
    if llama and args.threads:
        engine_args.setdefault("n_threads", args.threads)
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, device=args.device, cache_tokens=args.cache_tokens,
              max_batch_size=args.max_batch_size, **engine_args)
    names = [*args.draft_model, *([args.small_model] if args.small_model else []),
             *(n for n in args.allow_models.split(",") if n)]
    if llama:  # a draft / second model is a second llama.cpp model in the same process
        models = {name: load_llamacpp_backend(name, n_ctx=args.cache_tokens, n_threads=args.threads)
                  for name in dict.fromkeys(names)}
    else:
        models = {name: load_backend(name, dtype=args.dtype or "float32", device=args.device,
                                     cache_tokens=args.cache_tokens) for name in dict.fromkeys(names)}
    app = create_app(llm, model_name=args.served_model_name or args.model, api_key=args.api_key,
                     max_queue=args.max_queue, default_max_tokens=args.default_max_tokens, models=models,
                     small_model=args.small_model, metrics_auth=args.metrics_auth,
                     limits=Limits(max_body_bytes=args.max_body_bytes))
    print(f"decodekit: serving {args.served_model_name or args.model} at http://{args.host}:{args.port}/v1"
          + (f" (requests may also name: {', '.join(models)})" if models else ""), flush=True)
    print(f"decodekit: playground at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
