"""Shared benchmark helpers: device choice, timing (CUDA events or perf_counter), peak memory, bare LoRA models.

Peak memory: on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats (bytes above the
allocation at the start). On CPU (Linux), the process's peak resident set (VmHWM, reset by writing 5 to
/proc/self/clear_refs) above the resident set at the start, after malloc_trim(0) has returned glibc's
free heap to the OS (so the start counts live memory only; freed-and-reused memory inside the measured
region is counted once, as the real peak).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn



def _malloc_trim() -> None:
    """Give glibc's free heap memory back to the OS, so the resident set counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then pm.bytes = peak bytes above the start (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes, self.absolute = device, 0, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.absolute = torch.cuda.max_memory_allocated(self.device)
        else:
            self.absolute = _status_kib("VmHWM") * 1024
        self.bytes = max(self.absolute - self.start, 0)


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS above the start (malloc_trim, then VmHWM after clear_refs)"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}; torch {torch.__version__}; load average {load:.2f}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class BareLoRA(nn.Module):
    """A PEFT-shaped LoRA layer (lora_A, lora_B, scaling, base_layer on the meta device: never allocated)."""

    def __init__(self, out_f: int, in_f: int, r: int, device: torch.device, gen: torch.Generator) -> None:
        super().__init__()
        self.base_layer = nn.Linear(in_f, out_f, bias=False, device="meta")  # (out, in), no storage
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_f, r, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_f, bias=False, device=device)})
        with torch.no_grad():  # random trained-looking factors
            self.lora_A["default"].weight.copy_(torch.randn(r, in_f, generator=gen) / in_f ** 0.5)
            self.lora_B["default"].weight.copy_(torch.randn(out_f, r, generator=gen) * 0.01)
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]


def bare_model(shapes: dict[str, tuple[int, int]], r: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A module tree whose LoRA layers sit at the given dotted names, shapes (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, (out_f, in_f) in shapes.items():
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], BareLoRA(out_f, in_f, r, device, gen))
    return root


def random_mask(shapes: dict[str, tuple[int, int]], rho: float, seed: int = 0, config=None):
    """A FisherMask with ρ·numel random sorted int32 coordinates per module and random Fisher values."""
    from agl_core import AGLConfig, CoordinateBlock, FisherMask

    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, (out_f, in_f) in shapes.items():
        numel = out_f * in_f
        k = max(1, int(rho * numel))
        index = torch.randint(0, numel, (k,), generator=gen, dtype=torch.int64).unique()  # sorted
        fisher = torch.rand(index.numel(), generator=gen) + 0.05
        blocks[name] = CoordinateBlock((out_f, in_f), index.to(torch.int32), fisher, 0.55, 0.05)
    return FisherMask(blocks=blocks, config=config or AGLConfig(rho=rho))


def random_kfac_mask(shapes: dict[str, tuple[int, int]], k_in: int = 4, seed: int = 0):
    """A FisherMask of the demo's K-FAC basis shape (k_out=all, k_in input directions): per module a random
    orthonormal V (in, k_in), positive output weights μ (out,) and input energies λ (k_in,)."""
    from agl_core import AGLConfig, FisherMask, KFACBlock

    gen = torch.Generator().manual_seed(seed)
    blocks, cfg = {}, AGLConfig(basis="kfac", k_in=k_in, k_out="all", kfac_out_weight="g_diag")
    for name, (out_f, in_f) in shapes.items():
        V = torch.linalg.qr(torch.randn(in_f, k_in, generator=gen, dtype=torch.float64)).Q.float()
        mu, lam = torch.rand(out_f, generator=gen) + 0.1, torch.rand(k_in, generator=gen) * 3 + 0.05
        blocks[name] = KFACBlock((out_f, in_f), None, V, mu, lam, 0.9, 0.005)
    return FisherMask(blocks=blocks, config=cfg)


def llama_layer_shapes(prefix: str, hidden: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    """(out, in) of one Llama decoder layer's q,k,v,o,gate,up,down projections."""
    return {
        f"{prefix}.self_attn.q_proj": (hidden, hidden), f"{prefix}.self_attn.k_proj": (kv, hidden),
        f"{prefix}.self_attn.v_proj": (kv, hidden), f"{prefix}.self_attn.o_proj": (hidden, hidden),
        f"{prefix}.mlp.gate_proj": (inter, hidden), f"{prefix}.mlp.up_proj": (inter, hidden),
        f"{prefix}.mlp.down_proj": (hidden, inter),
    }


def smollm2_shapes(attention_only: bool = False) -> dict[str, tuple[int, int]]:
    """(out, in) of SmolLM2-135M's 30 layers' linear projections (q,k,v,o only with `attention_only`)."""
    shapes = {}
    for i in range(30):
        layer = llama_layer_shapes(f"model.layers.{i}", 576, 192, 1536)
        shapes.update({k: v for k, v in layer.items() if not attention_only or "self_attn" in k})
    return shapes
