"""LoRA adapters (Hu et al. 2021) on the model's linear layers, and QLoRA's quantized frozen base.

`apply_lora` swaps target `nn.Linear` layers for `LoRALinear`: the frozen base weight W
(kept in full precision, or as NF4/int8 for QLoRA) plus a trainable low-rank update,
y = x W^T + (alpha / r) * dropout(x) A^T B^T, with A [r, in] initialized like a linear
layer and B [out, r] zero, so training starts from the base model exactly. Only the
adapters train; `merge_lora` folds them into plain linear layers, and
`save_adapters`/`load_adapters` keep them on their own.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import Llama2Error
from .nf4 import frozen_linear, quantize_frozen

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    """Adapter settings: rank r, scaling alpha (the update is scaled by alpha / r), dropout,
    target module names (`wq` ... `w3`, `output`) and the frozen base's storage (None, "nf4", "int8")."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    quantize_base: str | None = None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = alpha / rank
        device = next(iter([*base.parameters(), *base.buffers()])).device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adapters stay float32 whatever the base's dtype (autocast still runs them in bf16).
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return frozen_linear(x, self.base) + (update * self.scale).to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in float32."""
        base = self.base.weight if isinstance(self.base, nn.Linear) else self.base.dequantize()
        return base.detach().float() + self.scale * (self.lora_b.detach().float() @ self.lora_a.detach().float())


def _target_linears(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every `nn.Linear` whose attribute name is a target."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze `model` and give its target linear layers LoRA adapters, in place.

    Args:
        model: a `Transformer` (any module with bias-free `nn.Linear` layers named like it).
        config: rank, alpha, dropout, targets and the base's storage.

    Returns:
        The model; only `lora_a`/`lora_b` parameters require gradients.

    Raises:
        Llama2Error: a bad rank, or no layer matches the targets.
    """
    if config.rank <= 0:
        raise Llama2Error(f"LoRA rank must be positive, got {config.rank}")
    layers = _target_linears(model, config.targets)
    if not layers:
        raise Llama2Error(f"no linear layer named {', '.join(config.targets)} to put LoRA adapters on")
    model.requires_grad_(False)
    for parent, name, linear in layers:
        if linear.bias is not None:
            raise Llama2Error(f"LoRA supports bias-free linear layers only ({name} has a bias)")
        base = linear if config.quantize_base is None else quantize_frozen(linear, config.quantize_base)
        setattr(parent, name, LoRALinear(base, config.rank, config.alpha, config.dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a plain `nn.Linear` holding W + (alpha / r) B A, in place.

    The merged layers have the base's dtype (float32 for quantized bases) and require
    no gradients, as the frozen base did.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                merged = child.merged_weight()
                dtype = child.base.weight.dtype if isinstance(child.base, nn.Linear) else torch.float32
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device=merged.device, dtype=dtype)
                linear.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
                setattr(parent, name, linear)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapters: ``layers.N.attention.wq.lora_a`` ... as contiguous tensors."""
    return {
        name: param.detach().contiguous()
        for name, param in model.named_parameters()
        if name.endswith((".lora_a", ".lora_b"))
    }


def save_adapters(model: nn.Module, config: LoRAConfig, folder: str | os.PathLike, base_model: str = "") -> Path:
    """Write `adapter.safetensors` and `adapter_config.json` into `folder` (each file atomically)."""
    from ..weights.common import atomic_output

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.cpu() for name, t in adapter_state_dict(model).items()}
    with atomic_output(folder / ADAPTER_WEIGHTS) as temp:
        save_file(tensors, str(temp), metadata={"format": "pt"})
    with atomic_output(folder / ADAPTER_CONFIG) as temp:
        temp.write_text(json.dumps({**asdict(config), "base_model": base_model}, indent=1))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    """The `LoRAConfig` saved with adapters in `folder`."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return LoRAConfig(**{k: v for k, v in values.items() if k != "base_model"})
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such adapter config") from None
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise Llama2Error(f"{path}: not a LoRA adapter config ({error})") from None


def load_adapters(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Apply the adapters saved in `folder` to a base `model` (in place) and return it.

    Raises:
        Llama2Error: missing files, or adapters that do not fit the model.
    """
    config = read_adapter_config(folder)
    apply_lora(model, config)
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise Llama2Error(f"{path}: no such adapter weights file")
    saved = load_file(str(path))
    expected = adapter_state_dict(model)
    if saved.keys() != expected.keys():
        different = sorted(saved.keys() ^ expected.keys())[:3]
        raise Llama2Error(f"{path}: adapters do not match the model ({', '.join(different)} ...)")
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise Llama2Error(f"{path}: {name} has shape {list(tensor.shape)}, the model {list(expected[name].shape)}")
    model.load_state_dict(saved, strict=False)
    return model
