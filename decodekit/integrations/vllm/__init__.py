"""decodekit on vLLM: ``LLM(model, backend="vllm")`` (``backend``), the request-level engine (``engine``),
per-request strategy forms (``strategies``), segment-level rollouts (``rollouts``), model preparation (``prep``)."""
