"""Alignment Fisher estimation: diagonal (`token`, `example`), K-FAC statistics and input covariances."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batches import IGNORE, as_batches, check_token_range, model_device, to_batch
from .blocks import KFACStats
from .estimators import FisherCounts, FisherEstimator, InputCovariance, KFACEstimator, resolve_estimator
from .hooks import LayerCapture, base_model_mode
from .modules import find_linear_modules

COUNT_BASE = 1 << 12  # counts travel in the float all-reduce buffer as (c // base, c % base): exact in fp32


def estimate_fisher(model: nn.Module, batches: Any, *, estimator: Any = "token",
                    target_modules: Optional[list[str]] = None, max_batches: Optional[int] = None,
                    progress: bool = True, shard: Optional[bool] = None,
                    generate_kwargs: Optional[dict[str, Any]] = None, tokenizer: Any = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher E_x[(∂ℓ/∂W0)²] of the base model (adapters off) for every base linear layer.

    Returns {base-model module name: (out, in) tensor} in float32 (float64 for a float64 model), where ℓ is
    an example's summed token NLL over its targets (labels != -100, shifted as a causal LM).
    batches: iterable of dicts with input_ids, optional attention_mask / labels (any device); or records
        (dicts with a prompt and optional response, or prompt strings) together with tokenizer=, turned into
        batches by `make_batches(records, tokenizer, model=model, **generate_kwargs)` (e.g. batch_size,
        max_length, max_new_tokens: records without a response get the model's greedy answer as target).
    estimator: 'token' (fast), 'example' (exact per example), or a FisherEstimator object / class.
    max_batches: use only the first N batches (counted before sharding).
    shard: under torch.distributed each rank takes batches i % world == rank (None/True); False means the
        iterable is already sharded per rank. The accumulators are summed by one all-reduce at the end.
    """
    est = resolve_estimator(estimator)
    return run_estimator(model, batches, est, target_modules=target_modules, max_batches=max_batches,
                         progress=progress, shard=shard, generate_kwargs=generate_kwargs, tokenizer=tokenizer)


def estimate_kfac(model: nn.Module, batches: Any, **kwargs: Any) -> dict[str, KFACStats]:
    """K-FAC statistics per base linear layer from the same hooks: X = Σ x xᵀ (in, in), G = Σ g gᵀ
    (out, out), count = non-padding tokens. Keyword arguments as in `estimate_fisher` (minus estimator)."""
    return run_estimator(model, batches, KFACEstimator(), **kwargs)


def estimate_input_covariance(model: nn.Module, batches: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Forward only: mean x xᵀ (in, in) over non-padding tokens per base linear layer (no targets needed);
    the reference covariance of the contrastive basis. Keyword arguments as in `estimate_fisher`; records
    are only tokenized (no targets are generated) unless generate_kwargs says otherwise."""
    kwargs["generate_kwargs"] = {"generate": "never", **(kwargs.get("generate_kwargs") or {})}
    return run_estimator(model, batches, InputCovariance(), **kwargs)


def run_estimator(model: nn.Module, batches: Any, est: FisherEstimator, *,
                  target_modules: Optional[list[str]] = None, max_batches: Optional[int] = None,
                  progress: bool = True, shard: Optional[bool] = None,
                  generate_kwargs: Optional[dict[str, Any]] = None, tokenizer: Any = None) -> Any:
    """One pass of `est` over the batches (hooks, sharding, the single all-reduce); returns est.result()."""
    model = _unwrap(model)
    _check_max_batches(max_batches)
    layers = select_layers(model, target_modules)
    needs_grad = bool(getattr(est, "needs_grad", True))
    data = as_batches(batches, tokenizer=tokenizer, model=model, options=generate_kwargs)
    rank, world = _dist_info()
    est.begin(layers)
    counts = FisherCounts()
    capture = LayerCapture(model, layers, est.accumulate, needs_grad=needs_grad,
                           per_example=bool(getattr(est, "per_example", False)))
    with base_model_mode(model), capture:
        for index, batch in _my_batches(data, rank, world, shard, max_batches, progress):
            _step(model, batch, index, capture, needs_grad, counts)
    counts = _all_reduce(est.buffers(), counts, world)
    _check_counts(counts, needs_grad, rank, world)
    return est.result(counts)


def select_layers(model: nn.Module, target_modules: Optional[list[str]]) -> dict[str, nn.Module]:
    """find_linear_modules, with a ValueError naming some available layers when nothing matches."""
    layers = find_linear_modules(model, target_modules)
    if not layers:
        available = list(find_linear_modules(model, None))
        hint = f"available linear layers include {available[:6]}" if available else "the model has no linear layers"
        raise ValueError(
            f"No linear modules match target_modules={target_modules!r}; {hint}. Use exact names, name "
            "suffixes such as 'q_proj', or 're:<regex>'."
        )
    return layers


def _step(model: nn.Module, batch: Any, index: int, capture: LayerCapture, needs_grad: bool,
          counts: FisherCounts) -> None:
    """Forward (and backward of the summed target NLL) for one batch; adds to `counts`."""
    ids, mask, labels = to_batch(batch, index, model_device(model))
    check_token_range(ids, labels, _vocab_size(model), index)
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted from position t
    has = targets != IGNORE
    n_batch = torch.stack([has.any(1).sum(), has.sum(), mask.sum()]).tolist()
    capture.mask, capture.active = mask, True
    try:
        if not needs_grad:
            with torch.no_grad():
                _forward(model, ids, mask)
        else:
            _backward(model, ids, mask, targets, capture)
    finally:
        capture.active = False
    counts.batches += 1
    counts.examples += int(n_batch[0])
    counts.target_tokens += int(n_batch[1])
    counts.tokens += int(n_batch[2])


def _backward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
              capture: LayerCapture) -> None:
    """Forward, then the gradient of the summed target NLL w.r.t. the activation roots (hooks collect g)."""
    with torch.enable_grad():
        logits = _forward(model, ids, mask)[:, :-1]  # (B, T-1, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        roots = capture.roots()
        if not roots or not loss.requires_grad:
            raise RuntimeError("AGL could not make the loss differentiable through the model's activations.")
        torch.autograd.grad(loss, roots, allow_unused=True)


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V); position ids follow the attention mask when there is padding."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask.long()}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if not bool(mask.all()) and _accepts(model, "position_ids"):
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _vocab_size(model: nn.Module) -> Optional[int]:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embed = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embed, "num_embeddings", None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (its forward would expect a parameter backward)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _check_max_batches(max_batches: Optional[int]) -> None:
    bad_type = not isinstance(max_batches, int) or isinstance(max_batches, bool)
    if max_batches is not None and (bad_type or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} is invalid: must be None or an integer ≥ 1.")


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _my_batches(data: Any, rank: int, world: int, shard: Optional[bool], max_batches: Optional[int],
                progress: bool) -> Iterator[tuple[int, Any]]:
    """(global index, batch) of this rank's shard, first `max_batches` only, under a tqdm bar on rank 0."""
    from tqdm.auto import tqdm

    step = world if shard is not False else 1
    offset = rank if step > 1 else 0
    indexable = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    total = len(data) if hasattr(data, "__len__") else None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    mine = None if total is None else len(range(offset, total, step))
    bar = tqdm(total=mine, desc="AGL Fisher", disable=not progress or rank != 0, leave=False)
    try:
        if indexable:
            source: Iterable[tuple[int, Any]] = ((i, data[i]) for i in range(offset, total, step))
        else:
            source = _strided(data, offset, step, max_batches)
        for item in source:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _strided(data: Iterable[Any], offset: int, step: int, max_batches: Optional[int]) -> Iterator[tuple[int, Any]]:
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if i % step == offset:
            yield i, batch


def _all_reduce(buffers: list[torch.Tensor], counts: FisherCounts, world: int) -> FisherCounts:
    """Sum every accumulator and the counts across ranks with ONE all_reduce on a flat buffer."""
    if world <= 1:
        return counts
    device = buffers[0].device if buffers else torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in buffers) else torch.float32
    split = [part for c in counts.as_list() for part in (c // COUNT_BASE, c % COUNT_BASE)]
    flat = torch.cat([b.reshape(-1).to(device, dtype) for b in buffers]
                     + [torch.tensor(split, dtype=dtype, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    parts = [int(round(v)) for v in flat[offset:].tolist()]
    return FisherCounts(*[parts[2 * i] * COUNT_BASE + parts[2 * i + 1] for i in range(len(parts) // 2)])


def _check_counts(counts: FisherCounts, needs_grad: bool, rank: int, world: int) -> None:
    where = f" (summed over {world} ranks)" if world > 1 else ""
    if counts.batches == 0:
        raise ValueError(f"No batches to estimate from{where}: pass a non-empty iterable of batches or records.")
    if counts.tokens == 0:
        raise ValueError(f"Every token of every batch is padding (attention_mask all 0){where}.")
    if needs_grad and counts.target_tokens == 0:
        raise ValueError(
            f"No target tokens: all labels are -100 (or padding) in {counts.batches} batch(es){where}. Give labels "
            "for the alignment targets (e.g. the responses), omit 'labels' to use every token, or build batches "
            "with make_batches(records, tokenizer, model=model) to use the model's greedy answers. If the prompts "
            "filled the whole max_length, the responses were cut off: raise max_length (agl fisher --max-length)."
        )
