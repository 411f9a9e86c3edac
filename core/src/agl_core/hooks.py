"""Hooks that hand each base linear layer's input x and output gradient g to a Fisher estimator."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

# sink(name, x (B, T, in), g (B, T, out) or None, mask (B, T) float 0/1); x and g are zero on padding.
Sink = Callable[[str, torch.Tensor, Optional[torch.Tensor], torch.Tensor], None]


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    """PEFT tuner layers (LoRA and others), found by duck typing wherever they sit in the model."""
    return [m for m in model.modules()
            if getattr(type(m), "adapter_layer_names", None) and callable(getattr(m, "enable_adapters", None))]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every PEFT tuner layer switched off, whichever object wraps them (PeftModel,
    LoraModel, or a transformers model with injected adapters); each layer's flag and every parameter's
    requires_grad are restored afterwards (PEFT's own enable/disable would change requires_grad)."""
    layers = _tuner_layers(model)
    was_disabled = [bool(getattr(m, "disable_adapters", False)) for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


@contextmanager
def base_model_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) with adapters disabled; restores every submodule's own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with adapters_disabled(model):
            yield
    finally:
        for module, training in modes:
            module.training = training


def as_per_example(t: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(…, d) laid out like `mask` (B, T) → (B, T, d); None if the token layout does not match the batch."""
    if t.dim() < 2 or t.shape[:-1].numel() != mask.numel():
        return None
    return t.reshape(*mask.shape, t.shape[-1])


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 models, float32 for everything else (bf16/fp16/fp32)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LayerCapture:
    """Forward hooks on the layers (and a tensor hook on each output): call `sink` with (x, g) per batch.

    needs_grad=False calls the sink from the forward hook with g=None (forward-only statistics).
    needs_grad=True makes the graph differentiable through activations only (the input embedding's output,
    or a layer output that does not require grad, becomes a leaf); `roots()` returns the tensors to pass to
    `torch.autograd.grad`, so no parameter ever receives a `.grad`.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], sink: Sink, *, needs_grad: bool,
                 per_example: bool = False) -> None:
        self.model, self.layers, self.sink = model, layers, sink
        self.needs_grad, self.per_example = needs_grad, per_example
        self.mask: Optional[torch.Tensor] = None  # (B, T) bool, set before each forward
        self.active = False  # hooks record only inside a Fisher step (not during target generation)
        self._roots: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []  # fallback roots: every hooked output that requires grad
        self._handles: list = []

    def __enter__(self) -> "LayerCapture":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        embed = _input_embeddings(self.model)
        if self.needs_grad and embed is not None:
            self._handles.append(embed.register_forward_hook(self._embedding_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._roots, self._outputs = [], []

    def roots(self) -> list[torch.Tensor]:
        """Tensors of the last forward to differentiate w.r.t. (taken: the lists are emptied).

        The activation roots when there are any; else (no input embedding found and the path to every layer
        runs through trainable weights) the hooked layer outputs themselves.
        """
        roots = self._roots or self._outputs
        self._roots, self._outputs = [], []
        return roots

    def _root(self, output: torch.Tensor) -> torch.Tensor:
        """A fresh leaf that requires grad in place of `output`; the model gets a copy (safe for in-place ops)."""
        leaf = output.detach().requires_grad_(True)
        self._roots.append(leaf)
        return leaf.clone()

    def _embedding_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.active or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        if output.requires_grad:  # trainable embedding: differentiate w.r.t. its output, not its weight
            self._roots.append(output)
            return None
        return self._root(output)

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            if not self.active:
                return None
            x, mask = inputs[0].detach(), self.mask
            if not self.needs_grad:
                self._deliver(name, x, None, mask)
                return None
            if output.requires_grad:
                if not inputs[0].requires_grad:  # grad only through the weight: differentiate w.r.t. the output
                    self._roots.append(output)
                self._outputs.append(output)
                output.register_hook(lambda g: self._deliver(name, x, g, mask))
                return None
            new_output = self._root(output)  # nothing upstream requires grad (no input embedding found)
            self._roots[-1].register_hook(lambda g: self._deliver(name, x, g, mask))
            return new_output

        return hook

    def _deliver(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        """Lay x (and g) out as (B, T, d), zero the padding tokens, cast to the accumulation dtype."""
        dtype = acc_dtype(x)
        x3 = as_per_example(x, mask)
        if x3 is None:
            if self.per_example:
                raise ValueError(
                    f"Layer {name!r} sees inputs of shape {tuple(x.shape)} that are not laid out per example "
                    f"(batch of {tuple(mask.shape)} tokens), so per-example gradients are undefined; use "
                    "estimator='token' or exclude the layer with target_modules."
                )
            x3, mask = x.reshape(1, -1, x.shape[-1]), torch.ones(1, x.shape[:-1].numel(), device=x.device)
        m = mask.to(x3.device, dtype).unsqueeze(-1)  # (B, T, 1); layers may sit on other devices (device_map)
        g3 = None if g is None else g.reshape(*x3.shape[:-1], g.shape[-1]).to(dtype) * m
        self.sink(name, x3.to(dtype) * m, g3, m.squeeze(-1))


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
