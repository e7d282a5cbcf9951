"""Exact top-k selection: exactly round(s * N) pruned, lowest first, ties by index."""
import pytest
import torch

from adamwprune.pruning.selection import num_to_prune, prune_masks


def reference_masks(scores, sparsity, scope):
    """Stable sort of the (concatenated) scores: the obvious, slow definition."""
    if scope == "layer":
        return [reference_masks([s], sparsity, "global")[0] for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = round(sparsity * flat.numel())
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(pruned[start:start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def test_lowest_scores_are_pruned_hand_computed():
    masks = prune_masks([torch.tensor([3.0, 1.0, 2.0, 0.0])], 0.5)
    assert masks[0].tolist() == [False, True, False, True]


def test_ties_are_broken_by_lower_index_first():
    masks = prune_masks([torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])], 0.6)  # k = 3
    assert masks[0].tolist() == [True, True, False, True, False]


def test_global_ties_follow_concatenation_order():
    scores = [torch.zeros(4, 5), torch.zeros(3)]
    masks = prune_masks(scores, 0.5, "global")  # N = 23, k = round(11.5) = 12
    assert int(sum(m.sum() for m in masks)) == 12
    assert masks[0].reshape(-1).tolist() == [True] * 12 + [False] * 8
    assert not masks[1].any()


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.77, 0.9, 1.0])
def test_all_zero_scores_prune_exactly_k(scope, sparsity):
    scores = [torch.zeros(7, 3), torch.zeros(2, 2, 3, 3), torch.zeros(5)]
    masks = prune_masks(scores, sparsity, scope)
    if scope == "global":
        assert int(sum(m.sum() for m in masks)) == round(sparsity * 62)
    else:
        for s, m in zip(scores, masks):
            assert int(m.sum()) == round(sparsity * s.numel())
    for got, want in zip(masks, reference_masks(scores, sparsity, scope)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("seed", range(6))
def test_selection_matches_stable_sort_reference_with_many_ties(scope, seed):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values, so almost every entry is tied with others.
    scores = [torch.randint(0, 4, shape, generator=g).float()
              for shape in [(6, 5), (4, 1, 3, 3), (11,)]]
    for sparsity in torch.rand(5, generator=g).tolist():
        for got, want in zip(prune_masks(scores, sparsity, scope),
                             reference_masks(scores, sparsity, scope)):
            assert torch.equal(got, want)


def test_minus_infinity_entries_are_pruned_first():
    scores = [torch.tensor([0.0, float("-inf"), 0.0]), torch.tensor([float("-inf"), 5.0])]
    masks = prune_masks(scores, 0.6, "global")  # k = 3
    assert masks[0].tolist() == [True, True, False]
    assert masks[1].tolist() == [True, False]


def test_selection_does_not_modify_scores():
    scores = [torch.tensor([2.0, 1.0, 2.0]), torch.tensor([[1.0, 0.0]])]
    copies = [s.clone() for s in scores]
    prune_masks(scores, 0.6, "global")
    assert all(torch.equal(a, b) for a, b in zip(scores, copies))


def test_num_to_prune_is_round_of_s_times_n():
    assert num_to_prune(0.5, 23) == 12
    assert num_to_prune(0.3, 10) == 3
    assert num_to_prune(0.0, 10) == 0
    assert num_to_prune(1.0, 10) == 10


def test_nan_at_the_kth_position_raises_value_error():
    with pytest.raises(ValueError, match="NaN"):
        prune_masks([torch.tensor([float("nan"), float("nan"), 1.0])], 1 / 3 * 2)


def test_unknown_scope_and_bad_sparsity_raise_value_error():
    with pytest.raises(ValueError, match="scope"):
        prune_masks([torch.zeros(3)], 0.5, "row")
    with pytest.raises(ValueError, match="sparsity"):
        prune_masks([torch.zeros(3)], 1.5)


def test_empty_score_list_gives_no_masks():
    assert prune_masks([], 0.5) == []
