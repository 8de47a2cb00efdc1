"""Q-VLM range search (Eq. 2-3): range candidates, coordinate descent, layer-wise vs block search."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle import fake_quantize

from qvlm_modifiers.qvlm.block_search import RangeVariable, coordinate_descent, search_block, spread_batch_indices
from qvlm_modifiers.qvlm.objective import (
    BlockObjective,
    block_mse_objective,
    combined_token_weights,
    modality_token_weights,
    token_error_weights,
)
from qvlm_modifiers.qvlm.ranges import (
    fake_quantize_observed,
    flatten_for_ranges,
    lp_norm_range,
    minmax_range,
    percentile_range,
    range_qparams,
)

GROUP4 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=16)
CHANNEL4_SYM = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")


def _qdq_reference(x, low, high, bits, symmetric):
    """Independent asymmetric/symmetric uniform QDQ of rows ``x`` [R, S] with ranges [R]."""
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = torch.maximum(low.abs(), high.abs()) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = (high - low) / (qmax - qmin)
        zp = torch.clamp(torch.round(qmin - low / scale), qmin, qmax)
    q = torch.clamp(torch.round(x / scale[:, None]) + zp[:, None], qmin, qmax)
    return (q - zp[:, None]) * scale[:, None]


@pytest.fixture
def weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    w[0, 3] = 9.0  # an outlier that clipping should cut
    return w


def test_percentile_ranges_match_torch_quantile(weight):
    obs = flatten_for_ranges(weight, "weight", GROUP4)  # (1, 8, 4, 16)
    assert obs.shape == (1, 8, 4, 16)
    groups = weight.reshape(8, 4, 16)
    for p in (1.0, 0.995, 0.98):
        low, high = percentile_range(obs, p, symmetric=False)
        torch.testing.assert_close(low, torch.quantile(groups, 1 - p, dim=-1))
        torch.testing.assert_close(high, torch.quantile(groups, p, dim=-1))
    lo1, hi1 = percentile_range(obs, 1.0, symmetric=False)
    mn, mx = minmax_range(obs)
    torch.testing.assert_close(lo1, mn)
    torch.testing.assert_close(hi1, mx)
    lo_s, hi_s = percentile_range(flatten_for_ranges(weight, "weight", CHANNEL4_SYM), 0.99, symmetric=True)
    torch.testing.assert_close(hi_s.reshape(-1), torch.quantile(weight.abs(), 0.99, dim=-1))
    torch.testing.assert_close(lo_s, -hi_s)


@pytest.mark.parametrize("norm", [0.5, 2.0])
def test_lp_norm_init_is_the_per_group_argmin(weight, norm):
    factors = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    obs = flatten_for_ranges(weight, "weight", GROUP4)
    low, high = lp_norm_range(obs, GROUP4, factors, norm)
    rows = weight.reshape(32, 16)
    mn, mx = rows.min(-1).values, rows.max(-1).values
    errs = torch.stack([(_qdq_reference(rows, mn * f, mx * f, 4, False) - rows).abs().pow(norm).sum(-1) for f in factors])
    best = torch.tensor(factors)[errs.argmin(0)]
    torch.testing.assert_close(high.reshape(-1), mx * best)
    torch.testing.assert_close(low.reshape(-1), mn * best)
    if norm < 1:
        assert (best < 1.0).any()  # the L0.5 norm (reference code's) prefers clipping somewhere


def test_candidate_qdq_matches_compressed_tensors_group_fake_quant(weight):
    obs = flatten_for_ranges(weight, "weight", GROUP4)
    low, high = percentile_range(obs, 0.99, symmetric=False)
    scale, zp = range_qparams(low, high, GROUP4)
    assert scale.shape == (8, 4)  # == the module's weight_scale shape for group 16
    ours = fake_quantize_observed(obs, scale, zp, GROUP4).reshape(8, 64)
    theirs = fake_quantize(weight, scale, zp, GROUP4)
    torch.testing.assert_close(ours, theirs)
    ref = _qdq_reference(weight.reshape(32, 16), low.reshape(-1), high.reshape(-1), 4, False).reshape(8, 64)
    torch.testing.assert_close(ours, ref)


# ----------------------------------------------------------------------------------------------
# coordinate descent
# ----------------------------------------------------------------------------------------------


class _Box:
    def __init__(self, n):
        self.values = [0.0] * n


def _scalar_vars(box, grids):
    out = []
    for i, grid in enumerate(grids):
        def apply(setting, _i=i):
            box.values[_i] = float(setting["v"])
        out.append(RangeVariable(f"v{i}", [{"v": torch.tensor(g)} for g in grid], [str(g) for g in grid], apply))
    return out


def test_coordinate_descent_separable_finds_argmin_and_stops_early():
    box = _Box(3)
    targets = [0.3, -1.0, 2.0]
    grids = [[0.0, 0.25, 0.5, 1.0], [0.0, -0.5, -1.0, -2.0], [1.0, 2.0, 3.0]]
    variables = _scalar_vars(box, grids)

    def objective():
        return sum((v - t) ** 2 for v, t in zip(box.values, targets))

    res = coordinate_descent(objective, variables, epochs=10)
    assert [v.label for v in variables] == ["0.25", "-1.0", "2.0"]
    assert res.epochs_run == 2  # one improving pass + one pass without change
    assert res.history == sorted(res.history, reverse=True)
    assert res.loss == pytest.approx(objective())


def test_coordinate_descent_never_increases_on_coupled_objective():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g)
    box = _Box(4)
    variables = _scalar_vars(box, [[-1.0, -0.5, 0.0, 0.5, 1.0]] * 4)
    for v in variables:
        v.current = 4

    def objective():
        x = torch.tensor(box.values)
        return float(x @ (a @ a.T) @ x - x.sum())

    res = coordinate_descent(objective, variables, epochs=10)
    assert res.loss <= res.initial_loss
    assert all(b <= a_ for a_, b in zip(res.history, res.history[1:]))
    # local optimality: no single-variable move improves
    for var in variables:
        keep = var.current
        for i in range(len(var.candidates)):
            var.set(i)
            assert objective() >= res.loss - 1e-12
        var.set(keep)


# ----------------------------------------------------------------------------------------------
# layer-wise (Eq. 2) vs block (Eq. 3) on a toy stack of fake-quantized Linear layers
# ----------------------------------------------------------------------------------------------


class _ToyStack:
    """Layers h -> h + tanh(Q(W_j) h): weight ranges chosen per layer from percentile candidates."""

    def __init__(self, n_layers=3, dim=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(dim, dim, generator=g) / dim**0.5 for _ in range(n_layers)]
        for w in self.weights:
            w[0, 0] = 6.0 / dim**0.5  # outliers make clipping matter
        self.current = [None] * n_layers
        self.enabled = False
        g2 = torch.Generator().manual_seed(seed + 1)
        self.inputs = [torch.randn(6, dim, generator=g2) for _ in range(3)]

    def layer(self, j):
        def run(h, _b):
            w = self.weights[j]
            if self.enabled:
                s, z = self.current[j]
                w = fake_quantize(w, s, z, GROUP4)
            return h + torch.tanh(h @ w.T)

        return run

    @contextlib.contextmanager
    def quantized(self, flag):
        old, self.enabled = self.enabled, flag
        try:
            yield
        finally:
            self.enabled = old

    def variables(self, j, percentiles=(1.0, 0.995, 0.99, 0.95, 0.9, 0.8)):
        obs = flatten_for_ranges(self.weights[j], "weight", GROUP4)
        cands, labels = [], []
        for p in percentiles:
            s, z = range_qparams(*percentile_range(obs, p, False), GROUP4)
            cands.append({"s": s, "z": z})
            labels.append(f"p={p}")

        def apply(setting, _j=j):
            self.current[_j] = (setting["s"], setting["z"])

        return [RangeVariable(f"w{j}", cands, labels, apply)]

    def fp_targets(self, layers, inputs):
        outs, x = [], inputs
        for j in layers:
            x = [self.layer(j)(h, 0) for h in x]
            outs.append(x)
        return outs

    def block_loss(self, layers, inputs, target):
        with self.quantized(True):
            total, n = 0.0, 0
            for h, y in zip(inputs, target):
                for j in layers:
                    h = self.layer(j)(h, 0)
                total += (h - y).pow(2).sum().item()
                n += y.numel()
        return total / n


def test_one_layer_block_is_exhaustive_layerwise_search():
    toy = _ToyStack()
    variables = toy.variables(0)
    target = toy.fp_targets([0], toy.inputs)
    res = search_block([toy.layer(0)], [variables], toy.quantized, toy.inputs, target, epochs=10)
    assert res.block is None and res.loss == res.layerwise_loss
    # brute force over the single variable's candidates
    losses = []
    for i in range(len(variables[0].candidates)):
        variables[0].set(i)
        losses.append(toy.block_loss([0], toy.inputs, target[0]))
    assert variables[0].current == min(range(len(losses)), key=losses.__getitem__)
    assert res.loss == pytest.approx(min(losses), rel=1e-6)


@pytest.mark.parametrize("use_fp_targets", [True, False])
def test_block_search_layerwise_stage_equals_singleton_blocks_and_never_does_worse(use_fp_targets):
    layers = [0, 1, 2]
    # (a) partition [[0], [1], [2]]: three one-layer blocks, each fed the previous quantized output
    toy_a = _ToyStack()
    fp_all = toy_a.fp_targets(layers, toy_a.inputs)
    x_q = toy_a.inputs
    singles = []
    for j in layers:
        var = toy_a.variables(j)
        targets = [fp_all[j]] if use_fp_targets else None
        singles.append(search_block([toy_a.layer(j)], [var], toy_a.quantized, x_q, targets, epochs=10))
        singles[-1].choice = var[0].current
        with toy_a.quantized(True):
            x_q = [toy_a.layer(j)(h, 0) for h in x_q]
    layerwise_choices = [s.choice for s in singles]

    # (b) one block [0, 1, 2]: Eq. 2 stage then Eq. 3 refinement
    toy_b = _ToyStack()
    variables = [toy_b.variables(j) for j in layers]
    targets = toy_b.fp_targets(layers, toy_b.inputs) if use_fp_targets else None
    res = search_block([toy_b.layer(j) for j in layers], variables, toy_b.quantized, toy_b.inputs, targets, epochs=10)
    # the layer-wise stage inside the block is exactly the singleton-block search
    assert [r.loss for r in res.layerwise] == pytest.approx([s.loss for s in singles], rel=1e-9)
    # and the block objective of that layer-wise solution is what res.layerwise_loss reports
    final_target = toy_b.fp_targets(layers, toy_b.inputs)[-1]
    if not use_fp_targets:
        with toy_b.quantized(False):
            final_target = toy_b.fp_targets(layers, toy_b.inputs)[-1]
    chosen = [v[0].current for v in variables]
    for v, c in zip(variables, layerwise_choices):
        v[0].set(c)
    assert toy_b.block_loss(layers, toy_b.inputs, final_target) == pytest.approx(res.layerwise_loss, rel=1e-6)
    for v, c in zip(variables, chosen):
        v[0].set(c)
    # block search never does worse than layer-wise on the calibration (block-output) objective
    assert res.loss <= res.layerwise_loss
    assert toy_b.block_loss(layers, toy_b.inputs, final_target) == pytest.approx(res.loss, rel=1e-6)


def test_block_search_beats_layerwise_somewhere():
    """Joint search is not a no-op: over a few seeds it strictly improves at least once."""
    improved = 0
    for seed in range(6):
        toy = _ToyStack(seed=seed)
        variables = [toy.variables(j) for j in range(3)]
        targets = toy.fp_targets(range(3), toy.inputs)
        res = search_block([toy.layer(j) for j in range(3)], variables, toy.quantized, toy.inputs, targets, epochs=10)
        assert res.loss <= res.layerwise_loss
        improved += res.loss < res.layerwise_loss
    assert improved >= 1


def test_lp_norm_init_mode_starts_block_descent_from_candidate_zero():
    toy = _ToyStack(seed=2)
    variables = [toy.variables(j) for j in range(3)]
    targets = toy.fp_targets(range(3), toy.inputs)
    res = search_block([toy.layer(j) for j in range(3)], variables, toy.quantized, toy.inputs, targets, epochs=10, init="lp_norm")
    assert res.layerwise == []
    # its starting point is every variable at candidate 0 (p=1.0 here)
    with toy.quantized(True):
        for v in variables:
            v[0].set(0)
        start = toy.block_loss(range(3), toy.inputs, targets[-1])
    assert res.block.initial_loss == pytest.approx(start, rel=1e-6)
    assert res.loss <= start


def test_exhaustive_small_block_bound():
    """Coordinate descent reaches a loss no worse than every single-variable deviation and within
    the exhaustive optimum's neighbourhood on a 2-layer toy (sanity for the search wiring)."""
    toy = _ToyStack(n_layers=2, seed=4)
    variables = [toy.variables(j, percentiles=(1.0, 0.95, 0.8)) for j in range(2)]
    targets = toy.fp_targets(range(2), toy.inputs)
    res = search_block([toy.layer(j) for j in range(2)], variables, toy.quantized, toy.inputs, targets, epochs=10)
    best = float("inf")
    for combo in itertools.product(range(3), repeat=2):
        for v, c in zip(variables, combo):
            v[0].set(c)
        best = min(best, toy.block_loss(range(2), toy.inputs, targets[-1]))
    assert best <= res.loss + 1e-12
    assert res.loss <= res.layerwise_loss


# ----------------------------------------------------------------------------------------------
# exact shortcuts of the fast search (memo, prefix cache, early stop) vs the plain reference
# ----------------------------------------------------------------------------------------------


def test_coordinate_descent_memo_changes_nothing_but_the_cost():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(5, 5, generator=g)
    runs = []
    for memo in (False, True):
        box = _Box(5)
        variables = _scalar_vars(box, [[-1.0, -0.5, 0.0, 0.5, 1.0]] * 5)

        def objective():
            x = torch.tensor(box.values)
            return float(x @ (a @ a.T) @ x - 2 * x.sum())

        res = coordinate_descent(objective, variables, epochs=10, memo=memo)
        runs.append((res, [v.current for v in variables]))
    (plain, plain_choice), (memo_res, memo_choice) = runs
    assert memo_choice == plain_choice and memo_res.history == plain.history and memo_res.loss == plain.loss
    assert memo_res.memo_hits > 0 and memo_res.evaluations + memo_res.memo_hits == plain.evaluations


def test_block_objective_equals_plain_objective_with_prefix_cache_and_early_stop():
    toy = _ToyStack(seed=1)
    variables = [toy.variables(j)[0] for j in range(3)]
    targets = toy.fp_targets(range(3), toy.inputs)[-1]
    plain = block_mse_objective([toy.layer(j) for j in range(3)], toy.inputs, targets)
    fast = BlockObjective([toy.layer(j) for j in range(3)], toy.inputs, targets, variables=variables, variable_layers=[0, 1, 2])
    g = torch.Generator().manual_seed(0)
    with toy.quantized(True):
        for _ in range(12):  # random walk over states, focusing a random variable each time
            for v in variables:
                v.current = int(torch.randint(len(v.candidates), (1,), generator=g))
                v.set(v.current)
            position = int(torch.randint(3, (1,), generator=g))
            fast.focus(position)
            trial = int(torch.randint(len(variables[position].candidates), (1,), generator=g))
            variables[position].set(trial)
            exact = plain()
            assert fast() == exact  # same layers, same summation order: bit-identical
            assert fast(bound=exact * 2) == exact  # bound not reached: the full loss
            early = fast(bound=exact * 0.3)  # stops once the partial sum passes the bound
            assert exact * 0.3 <= early <= exact
            variables[position].set(variables[position].current)


def test_token_relative_objective_matches_its_formula_and_ignores_token_scale():
    """block_objective "token_relative_mse": mean over tokens of ||out_t - y_t||^2 / ||y_t||^2, in both
    objective implementations; multiplying one token's output and target by 1000 (a massive activation)
    leaves it unchanged, while the plain MSE is then decided by that token."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 5, 8, generator=g) for _ in range(3)]
    targets = [x + 0.1 * torch.randn(x.shape, generator=g) for x in inputs]
    identity = [lambda h, b: h]

    def formula(xs, ys):
        return torch.cat([((x - y).pow(2).sum(-1) / y.pow(2).sum(-1)).flatten() for x, y in zip(xs, ys)]).mean().item()

    relative = block_mse_objective(identity, inputs, targets, kind="token_relative_mse")()
    assert relative == pytest.approx(formula(inputs, targets), rel=1e-6)
    fast = BlockObjective(identity, inputs, targets, kind="token_relative_mse")
    assert fast() == pytest.approx(relative, rel=1e-12)
    assert BlockObjective(identity, inputs, targets)() == pytest.approx(block_mse_objective(identity, inputs, targets)(), rel=1e-12)
    # a massive token: scale token 0 of every batch (input and target) by 1000
    scale = torch.ones(1, 5, 1)
    scale[0, 0] = 1000.0
    big_in, big_t = [x * scale for x in inputs], [y * scale for y in targets]
    assert block_mse_objective(identity, big_in, big_t, kind="token_relative_mse")() == pytest.approx(relative, rel=1e-5)
    plain, plain_big = block_mse_objective(identity, inputs, targets)(), block_mse_objective(identity, big_in, big_t)()
    assert plain_big > 1e4 * plain  # the plain objective is now that one token's
    with pytest.raises(ValueError, match="'mse', 'token_relative_mse' or 'mse_skip_first'"):
        token_error_weights(targets[0], "l1")


def test_modality_token_weights_follow_the_loss_mask():
    """0 (prompt/template) and 1 (answer) are text and weigh 1; 2 (image) weighs vision_weight."""
    mask = torch.tensor([[0, 2, 2, 2, 0, 1, 1]])
    weights = modality_token_weights(mask, torch.Size([1, 7, 16]), 0.125)
    assert weights.shape == (1, 7, 1)
    assert weights.flatten().tolist() == [1.0, 0.125, 0.125, 0.125, 1.0, 1.0, 1.0]
    # a flat mask is laid out like the hidden state's tokens too
    assert torch.equal(modality_token_weights(mask.flatten(), torch.Size([1, 7, 16]), 0.125), weights)


@pytest.mark.parametrize("kind", ["mse", "token_relative_mse"])
def test_token_weights_multiply_into_both_objectives(kind):
    """Given per-token weights, each token's squared error is multiplied by them (on top of the
    token-relative weighting), in the plain and the fast objective alike; all-ones weights are Eq. 3."""
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, 6, 8, generator=g) for _ in range(2)]
    targets = [x + 0.1 * torch.randn(x.shape, generator=g) for x in inputs]
    weights = [torch.rand(1, 6, 1, generator=g) for _ in range(2)]
    identity = [lambda h, b: h]
    expected = 0.0
    for x, y, w in zip(inputs, targets, weights):
        per_token = (x - y).pow(2).sum(-1, keepdim=True)
        if kind == "token_relative_mse":
            per_token = per_token * y.shape[-1] / y.pow(2).sum(-1, keepdim=True)
        expected += (per_token * w).sum().item()
    expected /= sum(y.numel() for y in targets)
    plain = block_mse_objective(identity, inputs, targets, kind=kind, token_weights=weights)()
    assert plain == pytest.approx(expected, rel=1e-6)
    assert BlockObjective(identity, inputs, targets, kind=kind, token_weights=weights)() == pytest.approx(plain, rel=1e-12)
    ones = [torch.ones(1, 6, 1)] * 2
    assert block_mse_objective(identity, inputs, targets, kind=kind, token_weights=ones)() == pytest.approx(
        block_mse_objective(identity, inputs, targets, kind=kind)(), rel=1e-12)
    assert combined_token_weights(targets[0], "mse", None) is None
    with pytest.raises(ValueError, match="one token-weight tensor"):
        BlockObjective(identity, inputs, targets, token_weights=weights[:1])
    with pytest.raises(ValueError, match="finite and >= 0"):
        BlockObjective(identity, inputs, targets, token_weights=[-w for w in weights])
    # early stop with weights: a bound below the loss rejects (returns a value >= the bound), a bound
    # above it returns the exact loss
    fast = BlockObjective(identity, inputs, targets, kind=kind, token_weights=weights)
    assert fast(bound=0.5 * plain) >= 0.5 * plain
    assert fast(bound=2 * plain) == pytest.approx(plain, rel=1e-12)


def test_token_weights_follow_batch_ids_when_the_search_uses_a_subset():
    """search_batches=2 of 4 (batches 0 and 2 searched): weight 0 on batch 2, whose targets are
    corrupted, gives the same search as clean targets; misaligned weights (by position in the subset
    instead of batch id) would weigh batch 2 with batch 1's weight and see the corruption."""
    toy = _ToyStack(seed=6)
    g = torch.Generator().manual_seed(1)
    toy.inputs = [torch.randn(6, 32, generator=g) for _ in range(4)]
    inputs = list(toy.inputs)
    clean = toy.fp_targets(range(2), inputs)
    corrupted = [[y + (5.0 * torch.randn(y.shape, generator=g) if b == 2 else 0.0) for b, y in enumerate(t)] for t in clean]
    weights = [torch.ones(6, 1), torch.ones(6, 1), torch.zeros(6, 1), torch.ones(6, 1)]
    outcomes = []
    for targets in (clean, corrupted):
        toy = _ToyStack(seed=6)
        toy.inputs = inputs
        variables = [toy.variables(j) for j in range(2)]
        res = search_block([toy.layer(j) for j in range(2)], variables, toy.quantized, inputs, targets,
                           epochs=10, search_batches=2, token_weights=weights)
        outcomes.append(([v[0].current for v in variables], res.search_loss, res.loss))
    assert spread_batch_indices(4, 2) == [0, 2]
    assert outcomes[1][0] == outcomes[0][0]
    assert outcomes[1][1] == pytest.approx(outcomes[0][1], rel=1e-6)
    assert outcomes[1][2] == pytest.approx(outcomes[0][2], rel=1e-6)


def test_zero_weighted_tokens_do_not_steer_the_search():
    """With weight 0 on some tokens (vision_token_weight: 0), corrupting those tokens' targets changes
    neither the choices nor the loss of the block search; without the weights it does change the loss."""
    toy = _ToyStack(seed=5)
    clean = toy.fp_targets(range(3), toy.inputs)
    ignored = torch.zeros(6, 1)
    ignored[:3] = 1.0  # tokens 0-2 of every batch are "vision" with weight 0
    weights = [1.0 - ignored for _ in toy.inputs]
    g = torch.Generator().manual_seed(0)
    corrupted = [[y + 5.0 * ignored * torch.randn(y.shape, generator=g) for y in layer_t] for layer_t in clean]
    results = []
    for targets, w in [(clean, weights), (corrupted, weights), (corrupted, None)]:
        toy = _ToyStack(seed=5)
        variables = [toy.variables(j) for j in range(3)]
        res = search_block([toy.layer(j) for j in range(3)], variables, toy.quantized, toy.inputs, targets,
                           epochs=10, token_weights=w)
        results.append((res.loss, [v[0].current for v in variables]))
    assert results[1] == (pytest.approx(results[0][0], rel=1e-6), results[0][1])
    assert results[2][0] > 10 * results[0][0]


@pytest.mark.parametrize("use_fp_targets,init,kind", [(True, "layerwise", "mse"), (False, "layerwise", "mse"),
                                                    (True, "lp_norm", "mse"), (True, "layerwise", "token_relative_mse")])
def test_fast_search_gives_the_reference_search_exactly(use_fp_targets, init, kind):
    results = []
    for reference in (True, False):
        toy = _ToyStack(seed=3)
        variables = [toy.variables(j) for j in range(3)]
        targets = toy.fp_targets(range(3), toy.inputs) if use_fp_targets else None
        res = search_block([toy.layer(j) for j in range(3)], variables, toy.quantized, toy.inputs, targets,
                           epochs=10, init=init, reference=reference, objective_kind=kind)
        evaluations = sum(r.evaluations for r in res.layerwise) + res.block.evaluations
        results.append((res, [v[0].current for v in variables], evaluations))
    (ref, ref_choice, ref_evals), (fast, fast_choice, fast_evals) = results
    assert fast_choice == ref_choice
    assert fast.loss == ref.loss and (fast.layerwise_loss == ref.layerwise_loss or init == "lp_norm")
    assert fast.block.history == ref.block.history
    assert fast_evals < ref_evals


def test_spread_batch_indices():
    assert spread_batch_indices(8, None) == list(range(8))
    assert spread_batch_indices(8, 8) == list(range(8)) == spread_batch_indices(8, 20)
    assert spread_batch_indices(8, 4) == [0, 2, 4, 6]
    assert spread_batch_indices(128, 32) == list(range(0, 128, 4))
    assert len(spread_batch_indices(10, 3)) == 3
    with pytest.raises(ValueError):
        spread_batch_indices(8, 0)


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_search_on_a_batch_subset_reports_all_batches_and_never_loses_to_layerwise(seed):
    toy = _ToyStack(seed=seed)
    toy.inputs = toy.inputs + [torch.randn(6, 32, generator=torch.Generator().manual_seed(seed + 9)) for _ in range(3)]
    variables = [toy.variables(j) for j in range(3)]
    targets = toy.fp_targets(range(3), toy.inputs)
    res = search_block([toy.layer(j) for j in range(3)], variables, toy.quantized, toy.inputs, targets, epochs=10,
                       search_batches=2)
    assert res.search_batches == 2
    # the searched objective used batches [0, 3] only ...
    sub = [0, 3]
    assert res.block.loss == pytest.approx(
        toy.block_loss(range(3), [toy.inputs[i] for i in sub], [targets[-1][i] for i in sub]), rel=1e-6)
    # ... but the reported loss is the block-output MSE of the final ranges on all six batches,
    assert res.loss == pytest.approx(toy.block_loss(range(3), toy.inputs, targets[-1]), rel=1e-6)
    # and it is never worse there than the layer-wise solution (kept where the joint one loses)
    assert res.loss <= res.layerwise_loss
    if res.kept_layerwise:
        assert res.loss == res.layerwise_loss


@torch.no_grad()
def test_replayed_linear_outputs_give_the_plain_search_exactly():
    """``LinearOutputReplay`` (the Linears before the searched one in its layer replay their outputs)
    must give the same choices and bit-identical losses as the plain objective, and replay something."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle import initialize_module_for_quantization

    from qvlm_modifiers.qvlm.cached_forward import quantization_enabled, replay_linear_outputs
    from qvlm_modifiers.qvlm.objective import LinearOutputReplay
    from qvlm_modifiers.qvlm.range_variables import qparam_variable

    args = QuantizationArgs(num_bits=3, type="int", symmetric=False, strategy="group", group_size=8)
    g = torch.Generator().manual_seed(0)

    def make_layers():
        torch.manual_seed(0)
        layers = [torch.nn.ModuleList([torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)]) for _ in range(2)]
        for layer in layers:
            for lin in layer:
                initialize_module_for_quantization(lin, QuantizationScheme(targets=["Linear"], weights=args))
        return layers

    inputs = [torch.randn(1, 12, 16, generator=g) for _ in range(3)]

    def run(replayed: bool):
        layers = make_layers()
        linears = [lin for layer in layers for lin in layer]
        fns = [lambda h, b, _l=layer: h + _l[1](torch.relu(_l[0](h))) for layer in layers]
        variables = [[qparam_variable(lin, "weight", flatten_for_ranges(lin.weight, "weight", args), args, f"l{i}{j}",
                                      (0.99, 0.95, 0.9), [1.0]) for j, lin in enumerate(layer)]
                     for i, layer in enumerate(layers)]
        with quantization_enabled(linears, False):
            targets = [[fns[0](x, b) for b, x in enumerate(inputs)]]
            targets.append([fns[1](y, b) for b, y in enumerate(targets[0])])
        replay = LinearOutputReplay() if replayed else None

        def quantized(on):
            return quantization_enabled(linears, on)

        ctx = replay_linear_outputs(linears, replay) if replayed else quantization_enabled([], True)
        forwards = [m.__dict__.get("forward") for m in linears]
        with ctx:
            res = search_block(fns, variables, quantized, inputs, targets, epochs=4, reference=not replayed, replay=replay)
        assert [m.__dict__.get("forward") for m in linears] == forwards  # wrappers removed
        return res, [v.current for vs in variables for v in vs], replay

    plain, plain_choice, _ = run(False)
    fast, fast_choice, replay = run(True)
    assert fast_choice == plain_choice and fast.loss == plain.loss and fast.layerwise_loss == plain.layerwise_loss
    assert replay.hits > 0


def test_token_relative_weights_stay_finite_for_a_zero_output_token():
    """A token whose FP block output is exactly zero (seen on a zoo Gemma 3's first layer) must not turn
    the default objective into NaN (0 error x infinite weight) or infinity: its weight is floored at
    1e-6 of the mean token's squared norm, the other tokens keep d / ||y_t||^2."""
    from qvlm_modifiers.qvlm.objective import token_error_weights

    y = torch.randn(1, 4, 8)
    y[0, 2] = 0.0
    w = token_error_weights(y, "token_relative_mse")
    assert torch.isfinite(w).all()
    norms = y.pow(2).sum(-1, keepdim=True)
    keep = [0, 1, 3]
    torch.testing.assert_close(w[0, keep], 8 / norms[0, keep])
    assert w[0, 2].item() == pytest.approx(8 / (norms.mean().item() * 1e-6), rel=1e-5)
    assert torch.isfinite(token_error_weights(torch.zeros(1, 3, 8), "token_relative_mse")).all()
