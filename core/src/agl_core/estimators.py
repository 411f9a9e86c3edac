"""Fisher estimators: accumulators fed (x, g) per layer and batch by the hooks, plus the name registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from .blocks import KFACStats
from .modules import logical_weight

# Elements of the (chunk, out, in) per-example gradient tensor materialised at once by `example`.
EXAMPLE_CHUNK_ELEMENTS = 1 << 25


@dataclass
class FisherCounts:
    """What one estimation pass saw (summed over ranks): batches, examples with ≥1 target, target and
    non-padding tokens."""

    batches: int = 0
    examples: int = 0
    target_tokens: int = 0
    tokens: int = 0

    def as_list(self) -> list[int]:
        return [self.batches, self.examples, self.target_tokens, self.tokens]


@runtime_checkable
class FisherEstimator(Protocol):
    """What `estimate_fisher(estimator=...)` accepts besides a registered name.

    needs_grad: False for forward-only statistics (g is then None).
    per_example: True if `accumulate` needs x and g laid out per example (B = examples of the batch).
    begin(layers): called once before the pass with the base linear layers keyed by base-model name;
        allocate the accumulators here (every rank must allocate the same ones).
    accumulate(name, x, g, mask): x (B, T, in), g (B, T, out) or None, mask (B, T) float 0/1; x and g are
        already zero on padding tokens and in float32 (float64 for float64 models). Called once per layer
        call per batch; g is the gradient of the summed (not averaged) target NLL.
    buffers(): every accumulator as a tensor; under torch.distributed they are summed across ranks in place.
    result(counts): the final statistics from the (reduced) buffers and FisherCounts.
    """

    needs_grad: bool
    per_example: bool

    def begin(self, layers: dict[str, nn.Module]) -> None: ...

    def accumulate(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None: ...

    def buffers(self) -> list[torch.Tensor]: ...

    def result(self, counts: FisherCounts) -> Any: ...


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, from out/in_features when present (quantised weights are packed)."""
    if isinstance(getattr(layer, "out_features", None), int) and isinstance(getattr(layer, "in_features", None), int):
        return (layer.out_features, layer.in_features)
    return tuple(logical_weight(layer).shape)


class SumEstimator:
    """Base of the built-in estimators: zero-initialised sums per layer, shapes given by `shapes`."""

    needs_grad = True
    per_example = False

    def shapes(self, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def begin(self, layers: dict[str, nn.Module]) -> None:
        self.acc: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in layers.items():
            weight = layer.weight
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            self.acc[name] = {
                key: torch.zeros(shape, dtype=dtype, device=weight.device)
                for key, shape in self.shapes(*layer_shape(layer)).items()
            }

    def buffers(self) -> list[torch.Tensor]:
        return [t for per_layer in self.acc.values() for t in per_layer.values()]


class TokenFisher(SumEstimator):
    """F += Σ_t (g_t ⊙ g_t)(x_t ⊙ x_t)ᵀ: one matmul per layer and batch; result / examples."""

    def shapes(self, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        return {"F": (out_f, in_f)}

    def accumulate(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        x2 = x.flatten(0, 1).square()  # (N, in)
        g2 = g.flatten(0, 1).square()  # (N, out)
        self.acc[name]["F"].addmm_(g2.T, x2)

    def result(self, counts: FisherCounts) -> dict[str, torch.Tensor]:
        return {name: acc["F"] / counts.examples for name, acc in self.acc.items()}


class ExampleFisher(TokenFisher):
    """F += (Σ_t g_t x_tᵀ)² per example: the exact per-example empirical Fisher (exact when each layer runs
    once per forward, as in decoder LMs; a layer called twice gets each call's gradient squared apart)."""

    per_example = True

    def accumulate(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        acc = self.acc[name]["F"]
        step = max(1, EXAMPLE_CHUNK_ELEMENTS // acc.numel())
        for start in range(0, x.shape[0], step):
            per = torch.einsum("bto,bti->boi", g[start:start + step], x[start:start + step])  # (b, out, in)
            acc.add_(per.square().sum(0))


class KFACEstimator(SumEstimator):
    """X += Σ_t x_t x_tᵀ (in, in), G += Σ_t g_t g_tᵀ (out, out); count = non-padding tokens."""

    def shapes(self, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        return {"X": (in_f, in_f), "G": (out_f, out_f)}

    def accumulate(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        x2d, g2d = x.flatten(0, 1), g.flatten(0, 1)  # (N, in), (N, out)
        self.acc[name]["X"].addmm_(x2d.T, x2d)
        self.acc[name]["G"].addmm_(g2d.T, g2d)

    def result(self, counts: FisherCounts) -> dict[str, KFACStats]:
        return {name: KFACStats(acc["X"], acc["G"], counts.tokens) for name, acc in self.acc.items()}


class InputCovariance(SumEstimator):
    """Forward only: mean x xᵀ (in, in) over non-padding tokens."""

    needs_grad = False

    def shapes(self, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        return {"X": (in_f, in_f)}

    def accumulate(self, name: str, x: torch.Tensor, g: Optional[torch.Tensor], mask: torch.Tensor) -> None:
        x2d = x.flatten(0, 1)  # (N, in)
        self.acc[name]["X"].addmm_(x2d.T, x2d)

    def result(self, counts: FisherCounts) -> dict[str, torch.Tensor]:
        return {name: acc["X"] / counts.tokens for name, acc in self.acc.items()}


BUILTIN_ESTIMATORS: Mapping[str, Callable[[], FisherEstimator]] = {"token": TokenFisher, "example": ExampleFisher}


def resolve_estimator(spec: Any, extra: Optional[Mapping[str, Callable[[], Any]]] = None) -> FisherEstimator:
    """A registered name (built-ins plus `extra`, e.g. from plugins), an estimator class, or an instance."""
    registry = {**BUILTIN_ESTIMATORS, **(extra or {})}
    if isinstance(spec, str):
        if spec not in registry:
            raise ValueError(f"Unknown Fisher estimator {spec!r}; valid estimators: {sorted(registry)}.")
        spec = registry[spec]
    if isinstance(spec, type):
        spec = spec()
    missing = [m for m in ("begin", "accumulate", "buffers", "result") if not callable(getattr(spec, m, None))]
    if missing:
        raise ValueError(
            f"Fisher estimator {spec!r} lacks method(s) {missing}: pass one of {sorted(registry)} or an object "
            "implementing agl_core.estimators.FisherEstimator (begin, accumulate, buffers, result)."
        )
    return spec
