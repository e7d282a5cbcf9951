"""N:M groups and ERK densities against hand-computed cases."""
import pytest
import torch

from adamwprune.pruning.patterns import (erk_densities, layer_densities, nm_applies, nm_masks,
                                         nm_sparsity, parse_pattern)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 1:8 ", (1, 8)),
                                           ("unstructured", None)])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:2", "2-4", "", "dense"])
def test_parse_pattern_refuses_what_is_not_n_of_m(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_nm_sparsity():
    assert nm_sparsity("2:4") == 0.5 and nm_sparsity("1:4") == 0.75


def test_every_group_keeps_its_two_largest_ties_by_index():
    # rows of a Linear(8 -> 2) weight; groups of 4 along the input dimension
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0],
                          [0.0, -1.0, 7.0, 0.0, 9.0, 8.0, 1.0, 2.0]])
    (mask,) = nm_masks([score], 2, 4, 1.0)
    expected = torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    groups = mask.reshape(-1, 4)
    assert (groups.sum(dim=1) == 2).all()


def test_gradual_nm_prunes_the_cheapest_groups_first_globally():
    a = torch.tensor([[1.0, 2.0, 9.0, 9.0]])            # cost 3
    b = torch.tensor([[5.0, 5.0, 9.0, 9.0],             # cost 10
                      [0.5, 0.5, 9.0, 9.0]])            # cost 1
    masks = nm_masks([a, b], 2, 4, 2 / 3)               # round(2/3 * 3) = 2 groups
    assert masks[0].tolist() == [[True, True, False, False]]
    assert masks[1].tolist() == [[False, False, False, False], [True, True, False, False]]
    # per layer: one group of each tensor's own (a: 1 of 1 -> round(2/3) = 1; b: 1 of 2)
    masks = nm_masks([a, b], 2, 4, 2 / 3, scope="layer")
    assert masks[0].tolist() == [[True, True, False, False]]
    assert masks[1].tolist() == [[False, False, False, False], [True, True, False, False]]


def test_already_pruned_groups_stay_chosen():
    score = torch.tensor([[float("-inf"), 3.0, float("-inf"), 4.0, 0.1, 0.2, 0.3, 0.4]])
    (mask,) = nm_masks([score], 2, 4, 0.5)  # one group of two: the pruned one costs -inf
    assert mask.tolist() == [[True, False, True, False, False, False, False, False]]


def test_conv_groups_run_along_the_flattened_input_and_kernel():
    w = torch.arange(16.0).reshape(2, 2, 2, 2)      # reduction 2*2*2 = 8: two groups per row
    (mask,) = nm_masks([w], 1, 4, 1.0)
    assert mask.reshape(2, 8).sum(dim=1).tolist() == [6, 6]
    assert mask.reshape(2, 8)[0].tolist() == [True, True, True, False] * 2


def test_a_tensor_that_groups_do_not_tile_stays_dense():
    assert not nm_applies((6, 1, 3, 3), 4) and nm_applies((6, 4, 3, 3), 4)
    assert not nm_applies((10, 6), 4) and nm_applies((10, 8), 4)
    odd, even = torch.randn(6, 1, 3, 3), torch.randn(3, 8)
    masks = nm_masks([odd, even], 2, 4, 1.0)
    assert not masks[0].any() and int(masks[1].sum()) == 12


def test_erk_densities_hand_computed_for_three_layers():
    # raw (sum of dims / numel): 30/200, 50/600, 25/100; the last would exceed 1 and is
    # dense; the other two share 450 - 100 = 350 weights in proportion 30 : 50.
    d = erk_densities([(10, 20), (20, 30), (5, 20)], 0.5)
    assert d == pytest.approx([0.65625, 0.3645833333, 1.0])
    kept = d[0] * 200 + d[1] * 600 + d[2] * 100
    assert kept == pytest.approx(450)


def test_erk_conv_uses_all_four_dims():
    d = erk_densities([(8, 4, 3, 3), (16, 8, 3, 3)], 0.8)
    raw = [(8 + 4 + 3 + 3) / 288, (16 + 8 + 3 + 3) / 1152]
    assert d[0] / d[1] == pytest.approx(raw[0] / raw[1])
    assert d[0] * 288 + d[1] * 1152 == pytest.approx(0.2 * (288 + 1152))


def test_uniform_densities():
    assert layer_densities([(4, 4), (2, 8)], 0.75, "uniform") == [0.25, 0.25]
    with pytest.raises(ValueError, match="distribution"):
        layer_densities([(4, 4)], 0.5, "normal")
