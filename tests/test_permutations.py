import pytest
import torch
from safetensors.torch import load_file

from clip4str.model.permutations import (
    causal_masks,
    cloze_query_mask,
    generate_permutations,
    permutation_masks,
)

T, F = True, False


def test_masks_of_a_known_permutation_match_hand_written():
    # Order: BOS, character 2, character 1, character 3, EOS.
    content, query = permutation_masks(torch.tensor([0, 2, 1, 3, 4]))
    assert content.tolist() == [
        [F, T, T, T],  # BOS sees only itself
        [F, F, F, T],  # character 1 comes after 2: sees BOS, 1 and 2
        [F, T, F, T],  # character 2 comes first: BOS and itself
        [F, F, F, F],  # character 3: everything before EOS
    ]
    assert query.tolist() == [
        [F, T, F, T],  # predicting character 1: BOS and character 2
        [F, T, T, T],  # predicting character 2: BOS only
        [F, F, F, T],  # predicting character 3: BOS, 1, 2
        [F, F, F, F],  # predicting EOS: all characters
    ]


def test_forward_permutation_gives_causal_masks():
    content, query = permutation_masks(torch.arange(6))
    causal, _ = causal_masks(5)
    assert torch.equal(content, causal)
    assert torch.equal(query, causal)  # query i predicts position i + 1 from positions 0..i


def test_generated_permutations_structure():
    perms = generate_permutations(6, num_perms=6, generator=torch.Generator().manual_seed(1))
    assert perms.shape == (6, 8)
    assert perms[0].tolist() == list(range(8))
    assert perms[1].tolist() == [0, 7, 6, 5, 4, 3, 2, 1]  # reverse, EOS with the empty context
    for a, b in ((2, 3), (4, 5)):
        assert perms[a, 0] == 0 and perms[a, -1] == 7
        assert perms[b, 1:-1].tolist() == perms[a, 1:-1].flip(0).tolist()
    again = generate_permutations(6, num_perms=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(perms, again)


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 6), (4, 6), (5, 6)])
def test_small_lengths_use_the_pool(n, expected):
    perms = generate_permutations(n, num_perms=6, generator=torch.Generator().manual_seed(0))
    assert perms.shape == (expected, n + 2)
    assert len({tuple(p) for p in perms.tolist()}) == expected  # no duplicates
    for p in perms.tolist():
        assert sorted(p) == list(range(n + 2)) and p[0] == 0


def test_cloze_query_mask_hides_only_the_target():
    mask = cloze_query_mask(4, 3)
    assert mask.tolist() == [[F, T, F], [F, F, T], [F, F, F], [F, F, F]]


def test_masks_and_seeded_draw_match_authors_fixture(parity_dir):
    out = load_file(str(parity_dir / "outputs.safetensors"))
    torch.manual_seed(2024)  # the fixture drew its random permutations right after this seed
    perms = generate_permutations(6, num_perms=6)
    assert torch.equal(perms, out["train_perms"])
    for i, perm in enumerate(perms):
        content, query = permutation_masks(perm)
        assert torch.equal(content, torch.isinf(out["train_content_masks"][i]))
        assert torch.equal(query, torch.isinf(out["train_query_masks"][i]))


def _loop_masks(perm):
    """The masks built one position at a time (the reference's way)."""
    size = perm.shape[0]
    hidden = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        hidden[perm[i], perm[i + 1:]] = True
    content = hidden[:-1, :-1].clone()
    hidden.fill_diagonal_(True)
    return content, hidden[1:, :-1]


def test_masks_of_many_permutations_at_once_equal_the_loops():
    g = torch.Generator().manual_seed(0)
    for chars in (1, 2, 4, 7, 25):
        perms = generate_permutations(chars, 6, generator=g)
        content, query = permutation_masks(perms)
        assert content.shape == query.shape == (len(perms), chars + 1, chars + 1)
        for i, perm in enumerate(perms):
            ref = _loop_masks(perm)
            assert torch.equal(content[i], ref[0]) and torch.equal(query[i], ref[1])
            assert all(torch.equal(a, b) for a, b in zip(permutation_masks(perm), ref, strict=True))
