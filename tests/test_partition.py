import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.config import ByFieldPartition, DirichletPartition, IidPartition
from securefed.data.datasets import Split
from securefed.data.partition import partition
from securefed.errors import DataError


def make_split(labels, **columns) -> Split:
    labels = np.asarray(labels, dtype=np.int64)
    table = {"text": [f"t{i}" for i in range(len(labels))], "label": [str(x) for x in labels], **columns}
    return Split(texts=table["text"], labels=labels, table=table, path="mem")


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(10, 400), clients=st.integers(1, 10), seed=st.integers(0, 2**32))
def test_iid_is_a_balanced_disjoint_cover(n, clients, seed):
    parts = partition(make_split(np.arange(n) % 2), clients, IidPartition(method="iid"), seed)
    assert len(parts) == clients
    assert_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=40, deadline=None)
@given(clients=st.integers(2, 8), alpha=st.floats(0.05, 100), seed=st.integers(0, 2**32))
def test_dirichlet_is_a_disjoint_cover_with_the_minimum_size(clients, alpha, seed):
    labels = np.random.default_rng(0).integers(0, 3, 600)
    config = DirichletPartition(method="dirichlet", alpha=alpha, min_examples=5)
    try:
        parts = partition(make_split(labels), clients, config, seed)
    except DataError as exc:  # very small alpha may never meet the minimum; that must be said, not hidden
        assert "min_examples" in str(exc)
        return
    assert_disjoint_cover(parts, 600)
    assert min(len(p) for p in parts) >= 5


def test_partitions_are_reproducible_and_depend_on_the_seed():
    split = make_split(np.random.default_rng(1).integers(0, 2, 1000))
    config = DirichletPartition(method="dirichlet", alpha=0.5)
    a, b, c = (partition(split, 4, config, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def label_skew(parts, labels) -> float:
    """Mean total-variation distance between each client's label mix and the global mix."""
    overall = np.bincount(labels, minlength=2) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=2) / len(p) - overall).sum() for p in parts]))


def test_smaller_alpha_means_more_label_skew():
    labels = np.random.default_rng(2).integers(0, 2, 5000)
    split = make_split(labels)
    skew = {a: np.mean([label_skew(partition(split, 8, DirichletPartition(method="dirichlet", alpha=a), s), labels)
                        for s in range(5)]) for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.05


def test_by_field_gives_each_value_its_own_client():
    split = make_split([0, 1, 0, 1, 0, 1], org=["b", "a", "b", "c", "a", "c"])
    parts = partition(split, 3, ByFieldPartition(method="by_field", field="org"), seed=0)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3, 5]]
    with pytest.raises(DataError, match="3 distinct values but federation.clients is 2"):
        partition(split, 2, ByFieldPartition(method="by_field", field="org"), seed=0)
    with pytest.raises(DataError, match="no field 'site'"):
        partition(split, 3, ByFieldPartition(method="by_field", field="site"), seed=0)


def test_more_clients_than_examples_is_an_error():
    with pytest.raises(DataError, match="cannot be shared among 5 clients"):
        partition(make_split([0, 1, 0]), 5, IidPartition(method="iid"), seed=0)
