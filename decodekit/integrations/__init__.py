"""Engines and frameworks above decodekit's engine: vLLM (``integrations.vllm``), trainers as they come."""
