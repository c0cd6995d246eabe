import numpy as np
import pytest

from securefed.client import Client, LocalTraining
from securefed.data import EncodedDataset
from securefed.secagg.plaintext import PlainSumClient

rng = np.random.default_rng(0)
DATA = EncodedDataset([[1] * int(n) for n in rng.integers(2, 60, 1000)], np.zeros(1000, dtype=np.int64))


def batches(round=1, cid=0, steps=40, size=16, group=False, data=DATA):
    training = LocalTraining(steps=steps, batch_size=size, learning_rate=0.1, learning_rate_decay=1.0,
                             weight_decay=0.0, seed=3, group_by_length=group)
    client = Client(cid, model=None, view=None, data=data, collator=None, training=training,
                    secure_sum=PlainSumClient())
    return client._batches(round)


def test_batches_are_seeded_by_round_and_client():
    assert np.array_equal(batches(), batches())
    assert not np.array_equal(batches(), batches(round=2))
    assert not np.array_equal(batches(), batches(cid=1))


@pytest.mark.parametrize("group", [False, True])
def test_one_pass_sees_each_example_at_most_once(group):
    b = batches(steps=60, size=16, group=group)
    assert b.shape == (60, 16)
    assert len(np.unique(b)) == b.size


def test_many_steps_cycle_through_whole_passes():
    b = batches(steps=150, size=20).reshape(-1)  # 3 passes over 1000 examples
    assert np.bincount(b, minlength=1000).tolist() == [3] * 1000


def test_grouping_by_length_sees_the_same_examples_with_less_padding():
    plain, grouped = batches(steps=100, group=False), batches(steps=100, group=True)
    assert sorted(plain.reshape(-1)) == sorted(grouped.reshape(-1))

    def width(b):
        return np.mean([max(len(DATA.input_ids[i]) for i in row) for row in b])

    assert width(grouped) < 0.6 * width(plain)


def test_batch_size_is_capped_by_the_client_data():
    small = EncodedDataset([[1, 2]] * 5, np.zeros(5, dtype=np.int64))
    assert batches(steps=3, size=16, data=small).shape == (3, 5)


def test_learning_rate_decays_per_round():
    training = LocalTraining(steps=1, batch_size=1, learning_rate=0.1, learning_rate_decay=0.5, weight_decay=0.0,
                             seed=0)
    assert [training.learning_rate_at(r) for r in (1, 2, 3)] == [0.1, 0.05, 0.025]
