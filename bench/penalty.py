"""The AGL penalty at real model shapes with random LoRA factors: sparse vs dense, vs a LoRA layer step, scaling.

Items 2 and 5 of issue #8. Base weights are never built for the penalty (LoRA layers on the meta device);
only the LoRA-layer comparison builds one base weight per distinct shape, one at a time.
Run: python -m bench.penalty [--quick] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

from bench.common import (PeakMemory, bare_model, fmt_bytes, llama_layer_shapes, machine, median_time,
                          memory_method, pick_device, random_kfac_mask, random_mask, smollm2_shapes, sync)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run: 4 of the 32 7B layers, fewer repeats")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tokens", type=int, default=None, help="tokens of the LoRA-layer step (default 4096 on GPU, 256 on CPU)")
    p.add_argument("--layers", type=int, default=None, help="7B-like layers (default 32, --quick 4)")
    p.add_argument("--sections", default="smollm,dense,floor,7b,70b,scaling",
                   help="comma-separated subset of smollm,dense,floor,7b,70b,scaling,7b4k,chunks (7b4k: one 7B-like layer "
                        "against its LoRA step on 4096 tokens, whatever the device; ~1 min on one loaded CPU core, so not "
                        "in the default CPU run; chunks: the fused path's chunk size, 2^16 to 2^20, on large supports)")
    p.add_argument("--plot", default="docs/perf_scaling.png", help="log-log scaling plot ('' to skip)")
    return p.parse_args()


def penalty_step(model, mask, config, chunk=None):
    """(callable running penalty forward + gradient wrt every LoRA factor, the bound AGLPenalty)."""
    from agl_core import AGLPenalty

    kw = {} if chunk is None else {"chunk_size": chunk}
    pen = AGLPenalty(model, mask, config, check_fingerprint=False, **kw)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        res = pen()
        return torch.autograd.grad(res.total, params)

    return run, pen


def measure(fn, device, repeats):
    """(median seconds, peak bytes above the start) of fn."""
    t = median_time(fn, device, repeats=repeats, warmup=1)
    with PeakMemory(device) as pm:
        fn()
    return t, pm.bytes


def config(rho):
    from agl_core import AGLConfig

    return AGLConfig(rho=rho, lambda_a=1.0, lambda_t=0.1, lambda_nc=0.1)


# ---------------------------------------------------------------- dense reference (timing only, float32)

def dense_step(A, B, scale, mask_block, cfg, device):
    """Penalty + gradient with ΔW and the masks materialised as (out, in) tensors (what the sparse path avoids)."""
    out_f, in_f = mask_block.shape
    flat = mask_block.index.long().to(device)
    fisher = mask_block.fisher.to(device)
    m = torch.zeros(out_f * in_f, device=device)
    fhat = torch.zeros(out_f * in_f, device=device)
    support = torch.zeros(out_f * in_f, device=device)
    m[flat], fhat[flat], support[flat] = fisher / (fisher + mask_block.kappa), fisher / mask_block.norm, 1.0
    m, fhat, support = m.view(out_f, in_f), fhat.view(out_f, in_f), support.view(out_f, in_f)

    def run():
        dw = scale * B @ A  # (out, in)
        dw_a = m * dw
        dw_t = dw - dw_a
        l_a = (fhat * dw_a * dw_a).sum()
        l_t = (dw_t * dw_t).sum()
        eta = 1 + cfg.beta * torch.sigmoid(dw.abs() - cfg.tau)
        e_rie = (support * eta * m * (1 - m) * dw * dw).sum() / max(flat.numel(), 1)
        inner = (dw_a * dw_t).sum()
        e_geo = inner * inner / ((dw_a * dw_a).sum() * l_t + cfg.eps)
        total = cfg.lambda_a * l_a + cfg.lambda_t * l_t + cfg.lambda_nc * (cfg.alpha * e_rie + (1 - cfg.alpha) * e_geo)
        return total, torch.autograd.grad(total, (A, B))

    return run


def lora_layer_time(out_f, in_f, r, tokens, device, repeats):
    """Median seconds of one LoRA linear layer forward + backward (input, A and B grads) on `tokens` tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(out_f, in_f, device=device, generator=gen) / in_f ** 0.5  # frozen base weight
    A = (torch.randn(r, in_f, device=device, generator=gen) / in_f ** 0.5).requires_grad_(True)
    B = (torch.randn(out_f, r, device=device, generator=gen) * 0.01).requires_grad_(True)
    x = torch.randn(tokens, in_f, device=device, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, out_f, device=device, generator=gen)

    def run():
        y = x @ W.t() + 2.0 * (x @ A.t()) @ B.t()  # (tokens, out)
        return torch.autograd.grad(y, (x, A, B), g)

    t = median_time(run, device, repeats=repeats, warmup=1)
    del W
    return t


# ---------------------------------------------------------------- sections

def section_smollm(device, repeats):
    """SmolLM2-135M shapes (30 layers, hidden 576, kv 192, MLP 1536): the before/after figure of the fused path,
    and the demo's K-FAC basis (k_in=4, k_out=all) on q,k,v,o."""
    from agl_core import AGLConfig

    print("\n## SmolLM2-135M shapes, random factors: penalty + gradient per optimizer step")
    rows = []
    for r, targets, rho in [(8, "qkvo", 0.01), (8, "all", 0.01), (64, "all", 0.10), (8, "qkvo", "kfac")]:
        shapes = smollm2_shapes(attention_only=targets == "qkvo")
        model = bare_model(shapes, r, device)
        if rho == "kfac":
            mask = random_kfac_mask(shapes, k_in=4)
            cfg = AGLConfig(**{**mask.config.mask_settings(), "lambda_t": 0.1, "lambda_nc": 0.1})
        else:
            mask, cfg = random_mask(shapes, rho), config(rho)
        run, pen = penalty_step(model, mask, cfg)
        t, mem = measure(run, device, repeats)
        rows.append((r, targets, rho, len(shapes), pen.num_protected, t, mem))
        what = "kfac k_in=4 k_out=all" if rho == "kfac" else f"rho={rho:<5g}"
        print(f"r={r:<3d} {targets:<4s} {what:<21s} modules {len(shapes):4d} |S|={pen.num_protected:>11,d}  "
              f"{t * 1e3:8.1f} ms  peak +{fmt_bytes(mem)}", flush=True)
    return rows


def section_dense(device, repeats):
    """One 4096×4096 module, r=16, ρ=1 %: sparse vs the dense reference and vs a LoRA layer step."""
    print("\n## 4096 x 4096, r=16, rho=1 %: sparse penalty vs dense reference")
    shapes = {"proj": (4096, 4096)}
    cfg, mask = config(0.01), random_mask(shapes, 0.01)
    model = bare_model(shapes, 16, device)
    run, _ = penalty_step(model, mask, cfg)
    t_s, m_s = measure(run, device, repeats)
    lora = model.proj
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    dense = dense_step(A, B, 2.0, mask.blocks["proj"], cfg, device)
    t_d, m_d = measure(dense, device, repeats)
    from agl_core import AGLPenalty

    sparse_total = float(AGLPenalty(model, mask, cfg, check_fingerprint=False)().total.detach())
    dense_total = float(dense()[0].detach())
    print(f"sparse {t_s * 1e3:.2f} ms, peak +{fmt_bytes(m_s)}; dense {t_d * 1e3:.2f} ms, peak +{fmt_bytes(m_d)}; "
          f"dense/sparse time {t_d / t_s:.1f}x, memory {m_d / max(m_s, 1):.1f}x; "
          f"totals agree to {abs(sparse_total - dense_total) / abs(dense_total):.1e} relative")
    return t_s, t_d, m_s, m_d


def section_model(name, shapes_per_layer, layers, r, rhos, tokens, device, repeats):
    """Whole-model penalty at `layers` layers vs `layers` × one LoRA decoder-layer step on `tokens` tokens."""
    print(f"\n## {name}: {layers} layer(s) x {len(shapes_per_layer)} modules, r={r}")
    step_layer = 0.0
    distinct: dict[tuple[int, int], int] = {}
    for shape in shapes_per_layer.values():
        distinct[shape] = distinct.get(shape, 0) + 1
    for (out_f, in_f), count in distinct.items():
        t = lora_layer_time(out_f, in_f, r, tokens, device, max(1, repeats // 2))
        step_layer += count * t
        print(f"LoRA layer {out_f}x{in_f} fwd+bwd on {tokens} tokens: {t * 1e3:.1f} ms (x{count} per layer)", flush=True)
    print(f"one decoder layer's LoRA linear layers: {step_layer * 1e3:.1f} ms; x{layers} = {step_layer * layers * 1e3:.0f} ms")
    out = []
    for rho in rhos:
        shapes = {}
        for i in range(layers):
            shapes.update({k.replace("L.", f"model.layers.{i}."): v for k, v in shapes_per_layer.items()})
        model = bare_model(shapes, r, device)
        mask = random_mask(shapes, rho)
        run, pen = penalty_step(model, mask, config(rho))
        t, mem = measure(run, device, max(2, repeats // 2))
        cache = sum(g.nbytes() for _, g in pen._groups())
        dense_bytes = sum(o * i for o, i in shapes.values()) * 4 * 8  # ≥ 8 float32 (out, in) tensors alive
        fits = dense_bytes < 0.25 * available_bytes(device)
        ratio = t / (step_layer * layers)
        print(f"rho={rho:<6g} |S|={pen.num_protected:>12,d}: penalty+grad {t * 1e3:9.1f} ms = {ratio * 100:6.2f} % "
              f"of the LoRA layers' step; peak +{fmt_bytes(mem)} = {mem / pen.num_protected:.1f} B/coordinate "
              f"(cache {cache / pen.num_protected:.0f} B/coordinate); dense reference "
              f"{'would need' if not fits else 'needs'} ≥ {fmt_bytes(dense_bytes)}"
              f"{': does not fit, not run' if not fits else ''}", flush=True)
        out.append((rho, pen.num_protected, t, mem, ratio))
        del model, mask, run, pen
    return out


def available_bytes(device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return 0.0


def section_floor(device, repeats):
    """Where the time of a large coordinate support goes: the whole penalty + gradient against its three sparse
    products alone (ΔW_S by SDDMM; ∂B = G·At; the column-order gather and ∂At = Gᵀ·B), per protected coordinate."""
    from agl_core.fused import FusedCoordinates, _csr

    print("\n## Per-coordinate cost at large supports (SmolLM2 shapes, all linear, rho=10 %)")
    for r in (8, 64):
        shapes = smollm2_shapes()
        model = bare_model(shapes, r, device)
        run, pen = penalty_step(model, random_mask(shapes, 0.10), config(0.10))
        (_, g), = [(i, g) for i, g in pen._groups() if isinstance(g, FusedCoordinates)]
        targets = [m.target for m in g.members]
        B = torch.cat([targets[i].B for i in g.b_order], 0).detach()
        At = torch.cat([targets[i].A.t() for i in g.a_order], 0).detach()
        values = torch.rand(g.size, device=device)
        grad_b, grad_at = torch.zeros_like(B), torch.zeros_like(At)

        def products():  # as the penalty runs them: products added into persistent gradient buffers
            for ch in g.row_chunks:
                cols = g.cols[ch.s0:ch.s1]
                pattern = _csr(ch.crow, cols, values[ch.s0:ch.s1], (ch.r1 - ch.r0, At.shape[0]))
                torch.sparse.sampled_addmm(pattern, B[ch.r0:ch.r1], At.t(), beta=0.0)
                rows = grad_b[ch.r0:ch.r1]
                torch.addmm(rows, pattern, At, out=rows)
            for ch in g.col_chunks:
                vals = values.index_select(0, g.perm[ch.t0:ch.t1])
                rows = grad_at[ch.c0:ch.c1]
                torch.addmm(rows, _csr(ch.ccol, g.rows_by_col[ch.t0:ch.t1], vals, (ch.c1 - ch.c0, B.shape[0])), B,
                            out=rows)

        t_all, t_sparse = [], []
        for _ in range(repeats):  # interleaved
            t_all.append(median_time(run, device, repeats=1, warmup=0))
            t_sparse.append(median_time(products, device, repeats=1, warmup=0))
        ta, tsp = statistics.median(t_all), statistics.median(t_sparse)
        n = pen.num_protected
        print(f"r={r:<3d} |S|={n:>11,d}: penalty + gradient {ta * 1e3:7.1f} ms = {ta * 1e9 / n:5.1f} ns/coordinate; "
              f"the three sparse products alone {tsp * 1e3:7.1f} ms = {tsp * 1e9 / n:5.1f} ns/coordinate "
              f"({tsp / ta * 100:.0f} %); the rest (element-wise terms, Grams, Python) "
              f"{(ta - tsp) * 1e9 / n:5.1f} ns/coordinate", flush=True)


def section_chunks(device, repeats):
    """Penalty + gradient at several `chunk_size`s on the same model and mask, timed interleaved (what the
    device's default chunk, agl_core.fused.default_chunk, was chosen from)."""
    from agl_core.fused import default_chunk

    print(f"\n## Chunk size of the fused path (SmolLM2 shapes, all linear; default here 2^{default_chunk(device).bit_length() - 1})")
    shapes = smollm2_shapes()
    sizes = [1 << k for k in range(16, 21)]
    for r, rho in ((8, 0.10), (64, 0.10), (8, 0.01), (64, 0.01)):
        model, mask = bare_model(shapes, r, device), random_mask(shapes, rho)
        runs = {c: penalty_step(model, mask, config(rho), chunk=c)[0] for c in sizes}
        times = {c: [] for c in sizes}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):
            for c, fn in runs.items():
                times[c].append(median_time(fn, device, repeats=1, warmup=0))
        med = {c: statistics.median(v) for c, v in times.items()}
        best = min(med, key=med.get)
        print(f"r={r:<3d} rho={rho:<5g}: " + ", ".join(f"2^{c.bit_length() - 1} {t * 1e3:.1f} ms" for c, t in med.items())
              + f"; fastest 2^{best.bit_length() - 1}", flush=True)
        del model, mask, runs


def section_scaling(device, repeats, plot):
    """Penalty time vs |S| (r=16) and vs r (|S| fixed): 8 modules 4096×4096; log-log slopes."""
    print("\n## Scaling: 8 modules of 4096 x 4096")
    shapes = {f"m{i}": (4096, 4096) for i in range(8)}
    by_s, by_r = [], []
    for rho in (1e-4, 1e-3, 1e-2, 5e-2):
        run, pen = penalty_step(bare_model(shapes, 16, device), random_mask(shapes, rho), config(rho))
        by_s.append((pen.num_protected, median_time(run, device, repeats=repeats)))
        print(f"r=16 |S|={by_s[-1][0]:>11,d}: {by_s[-1][1] * 1e3:8.2f} ms", flush=True)
    mask = random_mask(shapes, 1e-2)
    for r in (4, 8, 16, 32, 64):
        run, pen = penalty_step(bare_model(shapes, r, device), mask, config(1e-2))
        by_r.append((r, median_time(run, device, repeats=repeats)))
        print(f"|S|={pen.num_protected:,d} r={r:<3d}: {by_r[-1][1] * 1e3:8.2f} ms", flush=True)
    slope_s = loglog_slope(by_s[1:])  # the smallest |S| is dominated by fixed per-call costs
    slope_r = loglog_slope(by_r)
    print(f"log-log slope: time ~ |S|^{slope_s:.2f} (|S| ≥ {by_s[1][0]:,}), time ~ r^{slope_r:.2f}")
    if plot:
        save_plot(plot, by_s, by_r, device)
    return by_s, by_r, slope_s, slope_r


def loglog_slope(points):
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def save_plot(path, by_s, by_r, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agl_core import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, pts, label in ((axes[0], by_s, "|S| (r = 16)"), (axes[1], by_r, "r (|S| = 1 % of 8 × 4096²)")):
        xs, ys = [p[0] for p in pts], [p[1] * 1e3 for p in pts]
        ax.loglog(xs, ys, "o-", label="measured")
        ax.loglog(xs, [ys[-1] * x / xs[-1] for x in xs], "--", color="grey", label="linear")
        ax.set_xticks(xs, [f"{x:,}" if x < 100 else f"{x:.0e}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel("penalty + gradient (ms)")
        ax.legend()
    fig.suptitle(f"AGL penalty scaling ({device.type})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    quick = args.quick
    repeats = 3 if quick else 7
    tokens = args.tokens or (4096 if device.type == "cuda" else 256)
    layers = args.layers or (4 if quick else 32)
    sections = set(args.sections.split(","))
    print(f"# bench.penalty on {machine(device)}; memory: {memory_method(device)}")
    if "smollm" in sections:
        section_smollm(device, repeats)
    if "dense" in sections:
        section_dense(device, repeats)
    if "7b" in sections:
        section_model("Llama-7B-like", llama_layer_shapes("L", 4096, 4096, 11008), layers, 16, (1e-3, 1e-2),
                      tokens, device, repeats)
    if "70b" in sections:
        section_model("Llama-70B-like (per layer)", llama_layer_shapes("L", 8192, 1024, 28672), 1, 16,
                      (1e-3, 1e-2), tokens, device, repeats)
    if "floor" in sections:
        section_floor(device, repeats)
    if "7b4k" in sections:  # the 4k-token batch measured on any device (the 7b section uses --tokens)
        section_model("Llama-7B-like, 4096-token step", llama_layer_shapes("L", 4096, 4096, 11008), 1, 16,
                      (1e-3, 1e-2), 4096, device, 4)
    if "scaling" in sections:
        section_scaling(device, repeats, args.plot)
    if "chunks" in sections:
        section_chunks(device, max(repeats, 5))
    sync(device)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
