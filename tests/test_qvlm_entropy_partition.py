"""Q-VLM dependency proxy (Eq. 4-6) and block partition (Eq. 7) against direct evaluations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlm_modifiers.qvlm import entropy as entropy_mod
from qvlm_modifiers.qvlm.entropy import JointLevelAccumulator, conditional_entropy, level_probabilities
from qvlm_modifiers.qvlm.partition import OnlinePartitioner, partition_layers


# ----------------------------------------------------------------------------------------------
# direct NumPy evaluation of Eq. 4-5 (float64, element by element; independent of the module)
# ----------------------------------------------------------------------------------------------


def _levels_per_token(h: np.ndarray, m: int):
    low = h.min(axis=-1, keepdims=True)
    high = h.max(axis=-1, keepdims=True)
    step = (high - low) / (m - 1)
    return np.broadcast_to(low, h.shape), np.broadcast_to(step, h.shape)


def _soft_probs(h: np.ndarray, m: int, temperature_scale: float = 1.0) -> np.ndarray:
    """Eq. 5 for every element: p(x = q_m) = softmax_m(-(x - q_m)^2 / Delta)."""
    low, step = _levels_per_token(h, m)
    out = []
    for x, lo, d in zip(h.reshape(-1), low.reshape(-1), step.reshape(-1)):
        q = lo + d * np.arange(m)
        logits = -((x - q) ** 2) / (d * temperature_scale)
        logits -= logits.max()
        e = np.exp(logits)
        out.append(e / e.sum())
    return np.array(out)


def _hard_probs(h: np.ndarray, m: int) -> np.ndarray:
    low, step = _levels_per_token(h, m)
    idx = np.clip(np.rint((h - low) / step), 0, m - 1).astype(int).reshape(-1)
    return np.eye(m)[idx]


def _eq4(pa: np.ndarray, pb: np.ndarray) -> float:
    """Eq. 4: D = -sum_ab p(a,b) log p(b|a), joint over position-paired elements."""
    joint = np.einsum("ea,eb->ab", pa, pb) / pa.shape[0]
    marg = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / marg), 0.0)
    return float(-terms.sum())


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    h_k = torch.randn(2, 5, 12, generator=g)
    h_k1 = 0.7 * h_k + 0.5 * torch.randn(2, 5, 12, generator=g)  # correlated, like a residual stream
    return h_k, h_k1


@pytest.mark.parametrize("levels", [4, 16])
def test_soft_dependency_matches_direct_evaluation(pair, levels):
    h_k, h_k1 = pair
    acc = JointLevelAccumulator(levels, estimator="soft")
    acc.update(h_k, h_k1)
    ref = _eq4(_soft_probs(h_k.double().numpy(), levels), _soft_probs(h_k1.double().numpy(), levels))
    # float32 softmax vs float64 reference: relative error ~1e-6 on a quantity of order 1
    assert acc.entropy() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert 0.0 < acc.entropy() < np.log(levels)


def test_streaming_and_chunking_equal_one_pass(pair, monkeypatch):
    h_k, h_k1 = pair
    whole = JointLevelAccumulator(16)
    whole.update(h_k, h_k1)
    monkeypatch.setattr(entropy_mod, "_CHUNK_ELEMENTS", 7)  # force many chunks
    streamed = JointLevelAccumulator(16)
    for b in range(h_k.shape[0]):  # one batch at a time, like the calibration loop
        streamed.update(h_k[b : b + 1], h_k1[b : b + 1])
    assert streamed.count == whole.count == h_k.numel()
    torch.testing.assert_close(streamed.joint, whole.joint, rtol=1e-6, atol=1e-9)


def test_hard_assignment_matches_direct_and_is_the_soft_limit(pair):
    h_k, h_k1 = pair
    hard = JointLevelAccumulator(16, estimator="hard")
    hard.update(h_k, h_k1)
    ref = _eq4(_hard_probs(h_k.double().numpy(), 16), _hard_probs(h_k1.double().numpy(), 16))
    assert hard.entropy() == pytest.approx(ref, rel=1e-9, abs=1e-12)  # exact counts
    # T -> 0: the soft joint converges monotonically to the hard counts (Eq. 5's limit)
    distances = []
    for scale in (1.0, 1e-1, 1e-2, 1e-4, 1e-7):
        cold = JointLevelAccumulator(16, estimator="soft", temperature_scale=scale)
        cold.update(h_k, h_k1)
        distances.append((cold.joint - hard.joint).abs().sum().item())
    assert distances == sorted(distances, reverse=True) and distances[0] > 1.0
    # at T = 1e-7 Delta the nearest level wins every softmax in float32 (no element of this draw
    # lies within ~1e-6 Delta of a level midpoint)
    torch.testing.assert_close(cold.joint, hard.joint, rtol=0, atol=1e-9)
    assert cold.entropy() == pytest.approx(hard.entropy(), abs=1e-9)


def test_entropy_extremes():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 8, 32, generator=g)
    same = JointLevelAccumulator(8, estimator="hard")
    same.update(a, a)  # layer k+1 fully determined by layer k
    assert same.entropy() == pytest.approx(0.0, abs=1e-12)
    indep = JointLevelAccumulator(8, estimator="hard")
    b = torch.randn(64, 8, 32, generator=g)
    indep.update(torch.randn(64, 8, 32, generator=g), b)  # independent: D -> H(b)
    p_b = indep.joint.sum(0) / indep.joint.sum()
    h_b = float(-(p_b[p_b > 0] * p_b[p_b > 0].log()).sum())
    assert indep.entropy() == pytest.approx(h_b, rel=0.02)  # finite-sample bias of the plug-in estimate


def test_soft_probabilities_rows_sum_to_one_and_peak_at_nearest_level():
    x = torch.tensor([0.0, 0.26, 0.5, 0.74, 1.0])
    low, step = torch.zeros(5), torch.full((5,), 0.25)
    p = level_probabilities(x, low, step, 5, "soft", temperature=0.01)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    assert p.argmax(-1).tolist() == [0, 1, 2, 3, 4]


def test_conditional_entropy_of_a_known_joint():
    joint = torch.tensor([[2.0, 2.0], [0.0, 4.0]])  # p(b|a=0) uniform, p(b|a=1) deterministic
    assert conditional_entropy(joint) == pytest.approx(0.5 * np.log(2))


def test_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match="same shape"):
        JointLevelAccumulator(4).update(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))


# ----------------------------------------------------------------------------------------------
# partition (Eq. 7) on synthetic dependency sequences
# ----------------------------------------------------------------------------------------------


def _check_cover(blocks, n, max_len):
    assert [k for b in blocks for k in b] == list(range(n))
    assert all(1 <= len(b) <= max_len for b in blocks)
    assert all(b == list(range(b[0], b[-1] + 1)) for b in blocks)


def test_partition_fixed_threshold():
    # every link above h0: blocks fill up to the cap
    assert partition_layers([5.0] * 6, max_block_layers=3, threshold=1.0) == [[0, 1, 2], [3, 4, 5], [6]]
    # every link below h0: layer-wise
    assert partition_layers([0.5] * 3, max_block_layers=3, threshold=1.0) == [[0], [1], [2], [3]]
    # the *average* of the block's links decides (Eq. 7): 3 then 0.5 -> mean 1.75 > 1.5 keeps 3 layers
    assert partition_layers([3.0, 0.5, 3.0], max_block_layers=3, threshold=1.5) == [[0, 1, 2], [3]]
    # ... but 3 then 0.1 -> mean 1.55 < 2: boundary after layer 1
    assert partition_layers([3.0, 0.1, 3.0], max_block_layers=3, threshold=2.0) == [[0, 1], [2, 3]]
    assert partition_layers([5.0] * 4, max_block_layers=1, threshold=0.0) == [[0], [1], [2], [3], [4]]


def test_partition_running_mean_threshold_hand_computed():
    deps = [3, 3, 1, 2, 5, 5, 5, 1]
    # h0 at each link = running mean: 3, 3, 2.33, 2.25, 2.8, 3.17, 3.43, 3.125
    # link 4 (5 > 2.8) opens [4, 5]; link 5 (mean 5 > 3.17) grows to [4, 5, 6]; cap closes it
    blocks = partition_layers(deps, max_block_layers=3, threshold=None)
    assert blocks == [[0], [1], [2], [3], [4, 5, 6], [7], [8]]
    part = OnlinePartitioner(max_block_layers=3)
    for d in deps:
        part.observe_link(d)
    assert part.thresholds == pytest.approx([np.mean(deps[: i + 1]) for i in range(len(deps))])


@pytest.mark.parametrize("seed", range(5))
def test_partition_invariants_random(seed):
    rng = np.random.default_rng(seed)
    deps = rng.gamma(2.0, 1.0, size=int(rng.integers(1, 40))).tolist()
    for cap in (1, 2, 3, 5):
        for h0 in (None, float(np.median(deps))):
            blocks = partition_layers(deps, max_block_layers=cap, threshold=h0)
            _check_cover(blocks, len(deps) + 1, cap)
            running = [np.mean(deps[: i + 1]) for i in range(len(deps))]
            for b in blocks:  # Eq. 7 holds for every prefix of every block ...
                for end in range(b[0] + 1, b[-1] + 1):
                    thr = h0 if h0 is not None else running[end - 1]
                    assert np.mean(deps[b[0] : end]) > thr
            for b, nxt in zip(blocks, blocks[1:]):  # ... and fails (or the cap is hit) at each boundary
                thr = h0 if h0 is not None else running[b[-1]]
                assert len(b) == cap or np.mean(deps[b[0] : b[-1] + 1]) <= thr


def test_spread_token_mask_thins_the_pairs_evenly():
    from qvlm_modifiers.qvlm.entropy import spread_token_mask

    assert spread_token_mask((1, 40), 64) is None and spread_token_mask((1, 40), None) is None
    mask = spread_token_mask((2, 50), 25)
    assert mask.shape == (2, 50) and int(mask.sum()) == 25
    kept = mask.reshape(-1).nonzero().squeeze(1)
    assert kept[0] == 0 and kept[-1] == 99 and (kept.diff() >= 3).all() and (kept.diff() <= 5).all()
    # the masked update is the update of the kept tokens: same joint counts
    g = torch.Generator().manual_seed(0)
    h, h1 = torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g)
    masked, subset = JointLevelAccumulator(16), JointLevelAccumulator(16)
    masked.update(h, h1, mask)
    subset.update(h[mask][None], h1[mask][None])
    torch.testing.assert_close(masked.joint, subset.joint)
    assert masked.count == 25 * 8
    with pytest.raises(ValueError):
        spread_token_mask((1, 40), 0)


def test_masked_update_is_bit_identical_to_masking_after_the_level_grid():
    """The per-token level grid of a kept token depends on its own row only, so the update drops
    the other rows before computing it (cheaper): the joint counts equal, bit for bit, those of the
    former order (grid of every row, then the mask). The per-tensor grid still spans every row."""
    from qvlm_modifiers.qvlm.entropy import level_grid, spread_token_mask

    g = torch.Generator().manual_seed(1)
    h, h1 = torch.randn(1, 300, 64, generator=g) * 3, torch.randn(1, 300, 64, generator=g)
    mask = spread_token_mask((1, 300), 32)
    for grid in ("token", "tensor"):
        acc = JointLevelAccumulator(16, grid=grid)
        acc.update(h, h1, mask)
        tensors = []
        for x in (h, h1):  # the former order: grid on all rows, broadcast, then masked
            low, step = level_grid(x, 16, grid)
            tensors.append([t[mask].reshape(-1) for t in (x, low.expand_as(x), step.expand_as(x))])
        (xa, la, sa), (xb, lb, sb) = tensors
        reference = level_probabilities(xa, la, sa, 16).t().double() @ level_probabilities(xb, lb, sb, 16).double()
        assert torch.equal(acc.joint, reference), grid
        assert acc.count == 32 * 64
    # the tensor grid differs from the grid of the kept rows alone (it does use the other rows)
    whole, kept = JointLevelAccumulator(16, grid="tensor"), JointLevelAccumulator(16, grid="tensor")
    whole.update(h, h1, mask)
    kept.update(h[mask][None], h1[mask][None])
    assert not torch.equal(whole.joint, kept.joint)
