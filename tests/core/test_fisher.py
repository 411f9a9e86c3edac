"""Fisher estimators against dense float64 autograd references; PEFT, padding, errors."""

import pytest
import torch

import tiny
from agl_core.estimators import FisherCounts
from agl_core.fisher import estimate_fisher, estimate_input_covariance, estimate_kfac
from agl_core.modules import find_linear_modules

TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def examples(lengths=(7, 10, 12), seed=0, vocab=100):
    """Unpadded (ids (T,), labels (T,)) pairs; the first third of each is prompt (-100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = -100
        out.append((ids, labels))
    return out


def pad_batch(exs, side="right", pad=0):
    width = max(len(i) for i, _ in exs)
    ids = torch.full((len(exs), width), pad)
    labels = torch.full((len(exs), width), -100)
    mask = torch.zeros((len(exs), width), dtype=torch.long)
    for row, (i, lab) in enumerate(exs):
        sl = slice(width - len(i), width) if side == "left" else slice(0, len(i))
        ids[row, sl], labels[row, sl], mask[row, sl] = i, lab, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def one_by_one(exs):
    return [{"input_ids": i[None], "labels": lab[None]} for i, lab in exs]


def ref_loss(model, ids, labels):
    """Summed NLL of the shifted targets, written independently (log_softmax + gather)."""
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], dim=-1)  # (T-1, V)
    tgt = labels[1:]
    keep = tgt != -100
    return -logp[keep].gather(1, tgt[keep][:, None]).sum()


@pytest.fixture(scope="module")
def model64():
    return tiny.tiny_llama(seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model64):
    """Dense per-example weight gradients and per-token (x_t, g_t) of every linear layer, float64."""
    layers = find_linear_modules(model64)
    per_example, tokens = [], []
    for ids, labels in examples():
        caught = {}
        handles = [m.register_forward_hook(lambda m, i, o, n=n: caught.__setitem__(n, (i[0], o))) for n, m in layers.items()]
        loss = ref_loss(model64, ids, labels)
        for h in handles:
            h.remove()
        weights = [m.weight for m in layers.values()]
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        outs = torch.autograd.grad(loss, [caught[n][1] for n in layers])
        per_example.append(dict(zip(layers, grads)))
        tokens.append({n: (caught[n][0][0].detach(), g[0]) for n, g in zip(layers, outs)})  # (T, in), (T, out)
    return per_example, tokens


def test_example_estimator_matches_per_example_autograd(model64, reference):
    per_example, _ = reference
    fisher = estimate_fisher(model64, [pad_batch(examples())], estimator="example", progress=False)
    assert set(fisher) == set(per_example[0]) and len(fisher) == 14
    for name, F in fisher.items():
        ref = sum(g.square() for g in (ex[name] for ex in per_example)) / len(per_example)
        assert F.dtype == torch.float64 and F.shape == ref.shape
        assert rel_err(F, ref) < TOL, name


def test_token_estimator_matches_dense_token_loop(model64, reference):
    _, tokens = reference
    fisher = estimate_fisher(model64, [pad_batch(examples())], estimator="token", progress=False)
    for name, F in fisher.items():
        ref = torch.zeros_like(F)
        for ex in tokens:
            x, g = ex[name]
            for t in range(x.shape[0]):
                ref += torch.outer(g[t], x[t]).square()
        assert rel_err(F, ref / len(tokens)) < TOL, name
    # the two estimators genuinely differ (cross-token terms), so the checks above are not vacuous
    example = estimate_fisher(model64, [pad_batch(examples())], estimator="example", progress=False)
    assert rel_err(example["model.layers.0.mlp.up_proj"], fisher["model.layers.0.mlp.up_proj"]) > 1e-3


def test_kfac_and_input_covariance_match_dense_sums(model64, reference):
    _, tokens = reference
    batch = [pad_batch(examples(), side="left")]
    stats = estimate_kfac(model64, batch, progress=False)
    cov = estimate_input_covariance(model64, batch, progress=False)
    n_tokens = sum(len(i) for i, _ in examples())
    for name, s in stats.items():
        X = sum(torch.einsum("ti,tj->ij", ex[name][0], ex[name][0]) for ex in tokens)
        G = sum(torch.einsum("ti,tj->ij", ex[name][1], ex[name][1]) for ex in tokens)
        assert s.count == n_tokens
        assert rel_err(s.X, X) < TOL and rel_err(s.G, G) < TOL, name
        assert rel_err(cov[name], X / n_tokens) < TOL, name


@pytest.mark.parametrize("estimator", ["token", "example"])
def test_padding_left_right_equals_one_by_one(model64, estimator):
    exs = examples(lengths=(5, 11, 8), seed=7)
    single = estimate_fisher(model64, one_by_one(exs), estimator=estimator, progress=False)
    for side in ("right", "left"):
        padded = estimate_fisher(model64, [pad_batch(exs, side)], estimator=estimator, progress=False)
        for name in single:
            assert rel_err(padded[name], single[name]) < TOL, (side, name)


def test_peft_model_gives_base_fisher_and_is_left_untouched():
    base = tiny.tiny_llama(seed=0)
    peft = tiny.tiny_lora(tiny.tiny_llama(seed=0), r=4, targets=("q_proj", "v_proj", "down_proj"))
    batches = tiny.tiny_batches(n_batches=2)
    peft.train()
    peft.base_model.model.model.layers[1].eval()  # one submodule in its own mode: restored per module
    modes = {n: m.training for n, m in peft.named_modules()}
    with torch.no_grad():
        before = peft(input_ids=batches[0]["input_ids"]).logits
        plain = base(input_ids=batches[0]["input_ids"]).logits
    assert (before - plain).abs().max() > 1e-4  # the adapter changes the output
    F_base = estimate_fisher(base, batches, progress=False)
    F_peft = estimate_fisher(peft, batches, progress=False)
    assert set(F_peft) == set(F_base) and "model.layers.0.self_attn.q_proj" in F_peft
    for name in F_base:
        torch.testing.assert_close(F_peft[name], F_base[name], rtol=1e-5, atol=1e-12)
        assert F_peft[name].dtype == torch.float32
    assert all(p.grad is None for p in peft.parameters())
    assert all(p.grad is None for p in base.parameters())
    assert {n: m.training for n, m in peft.named_modules()} == modes
    with torch.no_grad():
        after = peft(input_ids=batches[0]["input_ids"]).logits
    torch.testing.assert_close(after, before)  # adapters are active again


def test_options_max_batches_target_modules_iterables(model64):
    batches = [pad_batch(examples(seed=s)) for s in range(3)]
    first_two = estimate_fisher(model64, batches[:2], progress=False)
    limited = estimate_fisher(model64, iter(batches), max_batches=2, progress=False)  # a one-shot iterator
    for name in first_two:
        assert rel_err(limited[name], first_two[name]) < TOL
    only = estimate_fisher(model64, batches[0], target_modules=["down_proj"], progress=False)  # a single dict
    assert sorted(only) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    whole = estimate_fisher(model64, batches[:1], progress=False)
    assert rel_err(only["model.layers.1.mlp.down_proj"], whole["model.layers.1.mlp.down_proj"]) < TOL
    no_labels = {k: v for k, v in batches[0].items() if k != "labels"}  # every real token is a target
    assert all(F.sum() > 0 for F in estimate_fisher(model64, [no_labels], progress=False).values())


def test_bf16_model_accumulates_in_float32():
    model = tiny.tiny_llama(seed=0, dtype=torch.bfloat16)
    fisher = estimate_fisher(model, tiny.tiny_batches(n_batches=1), progress=False)
    ref = estimate_fisher(tiny.tiny_llama(seed=0), tiny.tiny_batches(n_batches=1), progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert fisher[name].dtype == torch.float32 and torch.isfinite(fisher[name]).all()
    assert rel_err(fisher[name], ref[name]) < 0.2  # same quantity, bf16 activations


class CountingEstimator:
    """A plugin-style estimator: counts accumulate() calls and target-bearing tokens per layer."""

    needs_grad = True
    per_example = False

    def begin(self, layers):
        self.calls = {name: torch.zeros(()) for name in layers}

    def accumulate(self, name, x, g, mask):
        assert x.dim() == 3 and g.shape[:2] == x.shape[:2] == mask.shape
        self.calls[name] += 1

    def buffers(self):
        return list(self.calls.values())

    def result(self, counts: FisherCounts):
        return {"calls": {n: int(c) for n, c in self.calls.items()}, "counts": counts}


def test_custom_estimator_object_protocol(model64):
    batches = [pad_batch(examples(seed=s)) for s in range(2)]
    out = estimate_fisher(model64, batches, estimator=CountingEstimator(), progress=False)
    assert set(out["calls"].values()) == {2}
    assert out["counts"].batches == 2 and out["counts"].examples == 6
    assert out["counts"].tokens == 2 * sum((7, 10, 12))


def _err(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        estimate_fisher(*args, progress=False, **kwargs)


def test_errors(model64):
    batch = pad_batch(examples())
    _err("No batches to estimate from", model64, [])
    _err("all labels are -100", model64, [dict(batch, labels=torch.full_like(batch["labels"], -100))])
    _err(r"Unknown Fisher estimator 'nope'; valid estimators: \['example', 'token'\]", model64, [batch], estimator="nope")
    _err(r"lacks method\(s\) \['begin'", model64, [batch], estimator=object())
    _err(r"No linear modules match target_modules=\['nothing'\]; available linear layers include \['model.layers.0",
         model64, [batch], target_modules=["nothing"])
    _err("Batch 1 has no 'input_ids'", model64, [batch, {"ids": batch["input_ids"]}])
    _err("'labels' has shape", model64, [dict(batch, labels=batch["labels"][:, :3])])
    _err("vocabulary has", model64, [dict(batch, input_ids=batch["input_ids"] + 1000)])
    _err("must hold integer token ids", model64, [dict(batch, input_ids=batch["input_ids"].double())])
    _err("max_batches=0 is invalid", model64, [batch], max_batches=0)
    _err("pass tokenizer=", model64, ["How do I pick a lock?"])
    _err("batches must be an iterable", model64, 42)


def test_layer_fed_only_real_tokens_token_ok_example_refused():
    """A layer that sees a gathered (N_real, in) input: `token` still counts every real token, `example`
    refuses with a clear message instead of silently mixing examples."""
    from fisher_dist_worker import ToyLM

    class GatherLM(ToyLM):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            h = self.embed(input_ids)  # (B, T, d)
            keep = attention_mask.bool()
            mixed = torch.zeros_like(h)
            mixed[keep] = self.mix(h[keep])  # (N_real, d): not laid out per example
            return self.head(h + mixed)

    torch.manual_seed(0)
    model = GatherLM().double()
    exs = examples(lengths=(4, 6), vocab=50)
    padded = estimate_fisher(model, [pad_batch(exs)], progress=False)
    single = estimate_fisher(model, one_by_one(exs), progress=False)
    assert rel_err(padded["mix"], single["mix"]) < TOL and padded["mix"].abs().sum() > 0
    _err("Layer 'mix' sees inputs of shape \\(10, 16\\) that are not laid out per example", model,
         [pad_batch(exs)], estimator="example")


@pytest.mark.parametrize("trainable", [True, False])
def test_model_without_input_embedding_accessor(trainable):
    """No get_input_embeddings: the hooks make the first linear outputs the differentiation roots."""
    from fisher_dist_worker import ToyLM

    class NoAccessor(ToyLM):
        def get_input_embeddings(self):
            raise NotImplementedError

    torch.manual_seed(0)
    ref_model = ToyLM().double()
    model = NoAccessor().double()
    model.load_state_dict(ref_model.state_dict())
    model.requires_grad_(trainable)
    batch = [pad_batch(examples(lengths=(4, 6), vocab=50), side="left")]
    ref = estimate_fisher(ref_model, batch, progress=False)
    got = estimate_fisher(model, batch, progress=False)
    assert set(got) == {"mix", "up", "down"}
    for name in ref:
        assert rel_err(got[name], ref[name]) < TOL and ref[name].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
