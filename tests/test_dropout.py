"""Residual dropout's masks (model/dropout.py): random bytes in eager steps, a hash of the index compiled."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.device import can_compile
from model.dropout import cheap_dropout, dropout_seeds, hashed_keep
from model.gpt import GPT


def check_a_dropout(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """y is x with its share of elements dropped and the rest scaled; returns dy/dx, the scaled kept mask."""
    kept = y != 0
    share = round(p * 256) / 256
    assert abs((1 - kept.float().mean().item()) - share) < 0.005  # 1M elements: the standard error is 0.0004
    assert abs(share - p) <= 1 / 512
    torch.testing.assert_close(y[kept], x[kept] / (1 - share))
    rows = kept.view(x.size(0), -1).float().mean(1)
    assert rows.std() < 0.01, "masks differ row to row, no row dropped wholesale"
    return kept.float() / (1 - share)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_random_byte_dropout_drops_its_share_keeps_the_expectation_and_passes_gradients_through_the_mask(p):
    torch.manual_seed(0)
    x = torch.randn(64, 128, 128, requires_grad=True)
    y = cheap_dropout(x, p)
    gradient = check_a_dropout(x, y, p)
    ones = cheap_dropout(torch.ones(1_000_000), p)
    assert abs(ones.mean().item() - 1) < 0.01  # expectation unchanged
    y.sum().backward()
    torch.testing.assert_close(x.grad, gradient)
    assert cheap_dropout(x, 0.0) is x
    assert not torch.equal(cheap_dropout(x, p) != 0, y != 0), "a new mask each call"


def test_the_hashed_mask_looks_random_byte_by_byte_and_pair_by_pair():
    seed = torch.tensor(12345, dtype=torch.int32)
    shape = torch.Size((64, 128, 128))  # 1M elements
    keep = hashed_keep(shape, seed, 51)  # p = 0.2
    assert abs(keep.float().mean().item() - 205 / 256) < 0.002
    # Each of the 256 thresholds is crossed at its share: the low byte is uniform (chi-squared, 255 degrees of freedom).
    counts = torch.stack([hashed_keep(shape, seed, t).sum() for t in range(256)]).double()
    per_byte = torch.cat([counts[:-1] - counts[1:], counts[-1:]])  # elements whose byte is exactly t
    expected = keep.numel() / 256
    chi2 = ((per_byte - expected) ** 2 / expected).sum().item()
    assert chi2 < 340, f"the mask's byte is not uniform: chi-squared {chi2:.0f} (255 degrees of freedom)"
    # Neighbours (along a row, across rows, across positions) are independent: both kept at (205/256)^2.
    flat = keep.float()
    for a, b in ((flat[..., 1:], flat[..., :-1]), (flat[:, 1:], flat[:, :-1]), (flat[1:], flat[:-1])):
        assert abs((a * b).mean().item() - (205 / 256) ** 2) < 0.003
    other = hashed_keep(shape, torch.tensor(12346, dtype=torch.int32), 51)
    assert abs((keep & other).float().mean().item() - (205 / 256) ** 2) < 0.003, "the next seed is an unrelated mask"


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_compiled_hashed_dropout_recomputes_the_forward_mask_in_the_backward_pass(p):
    assert can_compile(torch.device("cpu")), "torch.compile on a CPU needs a C++ compiler (g++)"
    torch.manual_seed(0)
    x = torch.randn(64, 128, 128, requires_grad=True)
    seed = torch.tensor(777, dtype=torch.int32)
    compiled = torch.compile(lambda x, seed: (cheap_dropout(x, p, seed) * 3).sum(), fullgraph=True)
    loss = compiled(x, seed)
    loss.backward()
    eager = cheap_dropout(x.detach(), p, seed)  # the same hash, computed eagerly
    gradient = check_a_dropout(x.detach(), eager, p)
    torch.testing.assert_close(loss, (eager * 3).sum(), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(x.grad, 3 * gradient)


def test_only_a_compiled_cpu_forward_draws_seeds_and_a_compiled_model_trains_with_fresh_masks_each_step():
    assert dropout_seeds(4, torch.device("cpu")) is None, "eager steps use the random-byte mask"
    seeds = torch.compile(lambda: dropout_seeds(4, torch.device("cpu")), fullgraph=True)()
    assert seeds.dtype == torch.int32 and seeds.shape == (4,) and len(set(seeds.tolist())) == 4
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, context=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, dropout=0.5))
    x, y = torch.randint(0, 64, (2, 4, 16))
    graphs = []  # what torch.compile traces: one seed draw, and a recomputed hashed mask at each dropout site
    torch.compile(model, backend=lambda graph, _: graphs.append(graph) or graph.forward)(x, y)
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert (
        calls.count("tag_activation_checkpoint") == 2 * model.config.n_layer and sum("randint" in c for c in calls) == 1
    )
    compiled = torch.compile(model)
    losses = [compiled(x, y).item() for _ in range(3)]
    assert len(set(losses)) == 3, "each forward pass draws new masks"
    torch.manual_seed(1)
    first = compiled(x, y).item()
    torch.manual_seed(1)
    assert compiled(x, y).item() == first, "the seeds come from the model's random generator"
    model.eval()
    assert compiled(x, y).item() == pytest.approx(model(x, y).item(), rel=1e-5), "no dropout when evaluating"
