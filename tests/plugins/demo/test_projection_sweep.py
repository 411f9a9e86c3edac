"""The task-contrastive output directions of the projection sweep, against their definition in float64."""

import torch

from agl_plugins.demo.projection_sweep import generalized_top


def _spd(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return scale * (m @ m.T + n * torch.eye(n, dtype=torch.float64))


def test_with_an_isotropic_task_covariance_they_are_the_top_eigenvectors():
    GA = _spd(6, 0)
    Q = generalized_top(GA, torch.eye(6, dtype=torch.float64), 2, ridge=0.0)
    top = torch.linalg.eigh(GA)[1][:, -2:]
    assert torch.allclose(Q.T @ Q, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ Q.T, top @ top.T, atol=1e-10)  # the same span


def test_they_maximise_the_ratio_of_alignment_to_task_curvature():
    GA, GT = _spd(5, 1), _spd(5, 2)
    q = generalized_top(GA, GT, 1, ridge=0.0)[:, 0]
    best = (q @ GA @ q) / (q @ GT @ q)
    evals = torch.linalg.eigvals(torch.linalg.solve(GT, GA)).real
    assert torch.isclose(best, evals.max(), rtol=1e-10)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):  # no other direction has a larger ratio
        x = torch.randn(5, generator=g, dtype=torch.float64)
        assert (x @ GA @ x) / (x @ GT @ x) <= best + 1e-12


def test_layer_of_reads_the_decoder_layer_of_peft_and_plain_module_names():
    from agl_plugins.demo.projection_sweep import layer_of

    assert layer_of("base_model.model.model.layers.17.self_attn.v_proj") == 17
    assert layer_of("model.layers.0.self_attn.q_proj") == 0


def test_the_fisher_statistics_refuse_unknown_labels_before_any_work():
    import pytest

    from agl_plugins.demo.pipeline import estimate_stats

    for labels in ((), ("unsafe", "harmful")):
        with pytest.raises(ValueError, match="choose one or both of 'unsafe' and 'safe'"):
            estimate_stats(None, None, [], labels=labels)
