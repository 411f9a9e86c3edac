"""The demo's fine-tune data path: encoded rows, the Trainer collator, and the held-out task loss."""

import torch

import tiny
from agl_core.batches import IGNORE, encode_response, render_prompt
from agl_plugins.demo.train import PadCollator, encode_rows, mean_nll

ROWS = [{"prompt": "What is 2 + 3?", "response": "Step 1: 2 + 3 = 5. The answer is 5."},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "Count to three, please, slowly and clearly.", "response": "One, two, three."}]


def test_collator_trains_only_on_the_response_and_cuts_at_max_length():
    tok = tiny.tiny_tokenizer()
    rows = encode_rows(tok, ROWS, max_length=70)  # the last row (63 + 17 tokens) is cut inside its response
    batch = PadCollator(tok.pad_token_id, 70)(rows)
    assert len(rows) == 3 and batch["input_ids"].shape == (3, 70)
    for i, row in enumerate(ROWS):
        p, a = render_prompt(tok, row["prompt"]), encode_response(tok, row["response"])
        n = min(len(p) + len(a), 70)
        assert batch["input_ids"][i, :n].tolist() == (p + a)[:n]
        assert batch["attention_mask"][i].sum() == n
        assert batch["labels"][i, :n].tolist() == ([IGNORE] * len(p) + a)[:n]
        assert (batch["labels"][i, n:] == IGNORE).all() and (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert rows[i]["input_ids"] == (p + a)[:70]
    assert [r["prompt_ids"] for r in encode_rows(tok, ROWS, max_length=50)] == [r["prompt_ids"] for r in rows[:2]]


def test_mean_nll_is_the_token_averaged_response_nll():
    tok, model = tiny.tiny_tokenizer(), tiny.tiny_llama(seed=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ROWS:  # one unpadded sequence at a time, float64
            p, a = render_prompt(tok, row["prompt"]), encode_response(tok, row["response"])
            ids = torch.tensor([(p + a)[:60]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for pos in range(len(p), ids.shape[1]):
                total -= float(logp[pos - 1, ids[0, pos]])
                count += 1
    model.train()
    assert abs(mean_nll(model, tok, ROWS, max_length=60, batch_size=2) - total / count) < 1e-5
    assert model.training  # the training flags are restored
