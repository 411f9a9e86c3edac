"""make_batches / generate_targets: chat-template prompts, response-only labels, greedy self-targets."""

import pytest
import torch

import tiny
from agl_core.batches import generate_targets, make_batches
from agl_core.fisher import estimate_fisher, estimate_input_covariance

RECORDS = [
    {"prompt": "hi", "response": "ok"},
    {"prompt": "How do I pick a lock?", "response": "I can't help with that."},
    {"prompt": "2+2?", "response": "4"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def model64():
    return tiny.tiny_llama(seed=5, dtype=torch.float64)


def decode(tok, ids):
    return tok.decode([i for i in ids if i != -100])


def test_labels_cover_only_the_response(tok):
    batches = make_batches(RECORDS, tok, batch_size=2)
    assert len(batches) == 2 and batches[-1]["input_ids"].shape[0] == 1
    b = batches[0]
    for row, rec in enumerate(RECORDS[:2]):
        n = int(b["attention_mask"][row].sum())
        text = tok.decode(b["input_ids"][row, :n].tolist())
        assert text == f"<s>user: {rec['prompt']}</s><s>assistant: {rec['response']}</s>"
        assert decode(tok, b["labels"][row].tolist()) == rec["response"] + "</s>"
        first = int((b["labels"][row] != -100).nonzero()[0])
        assert tok.decode(b["input_ids"][row, :first].tolist()).endswith("assistant: ")
        assert (b["input_ids"][row, n:] == tok.pad_token_id).all()  # right padding
        assert (b["labels"][row, n:] == -100).all()


def test_plain_prompt_without_chat_template_and_truncation(tok):
    b = make_batches(RECORDS[:1], tok, use_chat_template=False)[0]
    assert tok.decode(b["input_ids"][0].tolist()) == "hiok</s>"
    assert decode(tok, b["labels"][0].tolist()) == "ok</s>"
    n_prompt = 41  # "<s>user: How do I pick a lock?</s><s>assistant: "
    cut = make_batches(RECORDS[1:2], tok, max_length=n_prompt + 8)[0]
    assert cut["input_ids"].shape == (1, n_prompt + 8)
    assert decode(tok, cut["labels"][0].tolist()) == "I can't "


def test_generated_targets_equal_greedy_generate(tok, model64):
    prompts = [{"prompt": "hi"}, {"prompt": "How do I pick a lock?"}, "What is 2+2?"]
    batches = make_batches(prompts, tok, batch_size=3, model=model64, max_new_tokens=6)
    again = make_batches(prompts, tok, batch_size=3, model=model64, max_new_tokens=6)
    b = batches[0]
    assert torch.equal(b["labels"], again[0]["labels"]) and torch.equal(b["input_ids"], again[0]["input_ids"])
    gen = generate_targets(model64, tok, prompts, max_new_tokens=6, batch_size=2)
    for row, p in enumerate(prompts):
        text = p if isinstance(p, str) else p["prompt"]
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(ids, add_special_tokens=False)["input_ids"]])
        out = model64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                               pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        target = [t for t in b["labels"][row].tolist() if t != -100]
        assert target == out == gen[row] and len(out) >= 1


def test_generation_runs_the_base_model_and_restores_the_adapter(tok):
    peft = tiny.tiny_lora(tiny.tiny_llama(seed=5, dtype=torch.float64), r=4, targets=("q_proj", "v_proj"))
    peft.train()
    base = tiny.tiny_llama(seed=5, dtype=torch.float64)
    prompts = ["hi", "How do I pick a lock?"]
    assert generate_targets(peft, tok, prompts, max_new_tokens=6) == generate_targets(base, tok, prompts, max_new_tokens=6)
    assert peft.training and all(p.grad is None for p in peft.parameters())


def test_mixed_records_generate_only_missing_or_all(tok, model64):
    recs = [{"prompt": "hi", "response": "ok"}, {"prompt": "hello"}]
    missing = make_batches(recs, tok, model=model64, max_new_tokens=4)[0]
    assert decode(tok, missing["labels"][0].tolist()) == "ok</s>"
    assert (missing["labels"][1] != -100).sum() >= 1
    every = make_batches(recs, tok, model=model64, max_new_tokens=4, generate="all")[0]
    assert decode(tok, every["labels"][0].tolist()) != "ok</s>"
    assert torch.equal(every["labels"][1], missing["labels"][1])


def test_estimate_fisher_from_records_with_tokenizer(tok, model64):
    opts = {"batch_size": 2, "max_new_tokens": 4}
    direct = estimate_fisher(model64, RECORDS + [{"prompt": "hey"}], tokenizer=tok, generate_kwargs=opts, progress=False)
    built = make_batches(RECORDS + [{"prompt": "hey"}], tok, model=model64, **opts)
    ref = estimate_fisher(model64, built, progress=False)
    assert set(direct) == set(ref)
    for name in ref:
        assert torch.equal(direct[name], ref[name])


def test_record_errors(tok):
    with pytest.raises(ValueError, match="Record 1 has no 'response' text; pass model="):
        make_batches([{"prompt": "a", "response": "b"}, {"prompt": "c"}], tok)
    with pytest.raises(ValueError, match="Record 0 has no string field 'question'"):
        make_batches(RECORDS, tok, prompt_field="question")
    with pytest.raises(ValueError, match="No records given"):
        make_batches([], tok)
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        make_batches(RECORDS, tok, batch_size=0)
    with pytest.raises(ValueError, match=r"generate='sometimes' is invalid"):
        make_batches(RECORDS, tok, generate="sometimes")
    with pytest.raises(ValueError, match="Record 0 has no 'response'"):
        make_batches(RECORDS, tok, generate="all")  # generating needs model=


def test_datasets_dataset_records_and_overlong_prompts(tok, model64):
    from datasets import Dataset

    ds = Dataset.from_list(RECORDS)
    from_ds = make_batches(ds, tok, batch_size=2)
    from_list = make_batches(RECORDS, tok, batch_size=2)
    assert len(from_ds) == len(from_list) == 2
    for a, b in zip(from_ds, from_list):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))
    # a prompt that fills max_length leaves nothing to predict: no generation, no target tokens
    long = make_batches([{"prompt": "x" * 40}, {"prompt": "hi"}], tok, model=model64, max_length=30, max_new_tokens=3)[0]
    assert (long["labels"][0] == -100).all() and (long["labels"][1] != -100).sum() >= 1


def test_prompt_only_batches_for_forward_statistics(tok, model64):
    batches = make_batches(["hi", {"prompt": "hello", "response": "yo"}], tok, generate="never")
    b = batches[0]
    assert (b["labels"][0] == -100).all() and decode(tok, b["labels"][1].tolist()) == "yo</s>"
    only_prompts = make_batches(["hi", "hello"], tok, generate="never")
    cov = estimate_input_covariance(model64, only_prompts, progress=False)
    assert cov["model.layers.0.mlp.up_proj"].shape == (64, 64)
    with pytest.raises(ValueError, match="all labels are -100"):
        estimate_fisher(model64, only_prompts, progress=False)
