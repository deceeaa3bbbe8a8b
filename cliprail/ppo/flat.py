"""All trainable parameters of a module in one contiguous buffer, gradients in another.

Small networks pay per-tensor overhead in the optimizer, gradient clipping and zeroing (a dozen
tensors of a 64-64 actor-critic cost more in Python dispatch than in arithmetic). After
:func:`flatten_parameters`, every parameter's ``.data`` is a view into one flat tensor and its
``.grad`` a view into one flat gradient, so Adam, the grad-norm clip and zeroing are one op each.
The maths is unchanged: Adam and the global norm are elementwise or global, so one flat tensor
updates exactly like its pieces. Backward accumulates in place into the existing ``.grad`` views,
so gradients must be zeroed in place (``ppo_update`` does), never set to None.
"""

from __future__ import annotations

import torch
from torch import nn


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Rebind ``module``'s trainable parameters (and their gradients) onto one flat buffer.

    Returns the flat parameter to give the optimizer and ``ppo_update`` in place of
    ``module.parameters()``. Call it after moving the module to its device; ``state_dict`` and
    ``load_state_dict`` keep working (they read and copy into the views).

    >>> lin = nn.Linear(3, 2)
    >>> flat = flatten_parameters(lin)
    >>> flat.numel(), lin.weight.data_ptr() == flat.data_ptr()
    (8, True)
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("flatten_parameters: the module has no trainable parameters")
    with torch.no_grad():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[offset : offset + n].view_as(p)
        p.grad = flat.grad[offset : offset + n].view_as(p)
        offset += n
    return flat
