"""Worker for test_fisher_distributed: one gloo rank on a small pure-torch LM (no transformers); saves results."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from agl_core.fisher import estimate_fisher, estimate_kfac


class ToyLM(nn.Module):
    """Embedding → causal running mean mixer → MLP → head; forward(input_ids, attention_mask) → logits."""

    def __init__(self, vocab: int = 50, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix, self.up, self.down = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)  # (B, T, d)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m[..., None].to(h.dtype)  # (B, T, 1)
        context = (h * m).cumsum(1) / m.cumsum(1).clamp(min=1)  # mean over earlier real tokens
        h = h + self.mix(context)
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)  # (B, T, vocab)


def data():
    """Five right-padded batches of uneven sizes (3 + 2 over two ranks) and a float64 model."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for n, seq in [(2, 9), (3, 7), (1, 12), (2, 5), (3, 10)]:
        ids = torch.randint(0, 50, (n, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq - 2:] = 0
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    torch.manual_seed(1)
    return ToyLM().double(), batches


def compute(model, batches, rank, world):
    """Every quantity the test compares: sharded by the estimator, pre-sharded, and with an empty shard."""
    return {
        "token": estimate_fisher(model, batches, progress=True),
        "example": estimate_fisher(model, batches, estimator="example", progress=False),
        "kfac": {k: (s.X, s.G, s.count) for k, s in estimate_kfac(model, batches, progress=False).items()},
        "presharded": estimate_fisher(model, batches[rank::world], shard=False, progress=False),
        "empty_shard": estimate_fisher(model, batches if rank == 0 else [], shard=False, progress=False),
        "max_batches": estimate_fisher(model, batches, max_batches=3, progress=False),
    }


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batches = data()
        torch.save(compute(model, batches, rank, world), sys.argv[1])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
