"""Packed float32 weights for the few-row matrix products of verify and batched decode steps on CPU.

PyTorch's float32 ``linear`` on CPU packs the weight matrix inside every call once the input has
more than ~3 rows, so a forward of 4-8 tokens (a speculative verify, a batch of 4-8 decode rows)
costs 1.5-2x a one-token forward although it reads the same weights. Packing each weight once
with MKL (``torch.ops.mkl._mkl_reorder_linear_weight``) and computing with the packed copy makes
4-16 rows cost little more than one. Rows outside that range (single-token decode, prefill) keep
the stock path. The packed copy doubles the linear layers' weight memory.

A check at packing time compares the packed product with the stock one for every row count the
packed path serves; if they differ (an MKL whose packed format depends on the row count), nothing
is packed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

MIN_ROWS, MAX_ROWS = 4, 16  # the packed path serves inputs of this many rows (tokens x batch)
PACK_ROWS = 8  # the row count the weights are packed for


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def pack_linears(model: torch.nn.Module) -> int:
    """Give every CPU float32 ``nn.Linear`` of ``model`` a packed copy used for 4-16 rows; returns how many.

    The modules keep their class and weights (quantization, ``state_dict`` and copies still see
    plain ``nn.Linear`` layers); only the instance's ``forward`` changes.
    """
    if not available():
        return 0
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32 and not hasattr(m, "_packed_weight")]
    if not linears:
        return 0
    first = _pack(linears[0])
    if not _packed_path_exact(linears[0].weight.detach(), first):
        return 0
    for module in linears:
        module._packed_weight = first if module is linears[0] else _pack(module)
        module.forward = _packed_forward(module)
    return len(linears)


def repack_linears(model: torch.nn.Module) -> int:
    """Re-pack every packed linear layer from its current weights (after new weights were loaded)."""
    packed = [m for m in model.modules() if "_packed_weight" in m.__dict__]
    for module in packed:
        module._packed_weight = _pack(module)
        module.forward = _packed_forward(module)
    return len(packed)


def _pack(module: torch.nn.Linear) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(module.weight.detach(), PACK_ROWS)


def _packed_forward(module: torch.nn.Linear):
    weight, packed, bias = module.weight, module._packed_weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if MIN_ROWS <= rows <= MAX_ROWS and not torch.is_grad_enabled() and x.dtype == torch.float32:
            return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)
        return F.linear(x, weight, bias)

    return forward


def _packed_path_exact(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows in range(MIN_ROWS, MAX_ROWS + 1):
            x = torch.randn(rows, weight.shape[1], generator=generator)
            ours = torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
            if not torch.allclose(ours, F.linear(x, weight), rtol=1e-4, atol=1e-4):
                return False
    return True


@contextmanager
def unpacked(model: torch.nn.Module):
    """``model`` with its packed copies set aside (packed MKL tensors cannot be deep-copied)."""
    saved = [(m, m.__dict__.pop("forward"), m.__dict__.pop("_packed_weight")) for m in model.modules()
             if "_packed_weight" in m.__dict__]
    try:
        yield model
    finally:
        for module, forward, packed in saved:
            module._packed_weight, module.forward = packed, forward
