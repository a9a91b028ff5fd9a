"""Training and distillation: build the artefacts the runtime loads (draft heads, distilled students).
The runtime never imports this package; it only reads what it saved."""
