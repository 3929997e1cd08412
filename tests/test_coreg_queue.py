"""MoCo queue and key-encoder updates (coreg-method.md §3.6, §6.11)."""

import pytest
import torch
from torch import nn

from pipeline.coreg.queue import FeatureQueue, copy_weights, momentum_update


def batch(values, c=3):
    """Keys whose rows are [v, −v], one-hot labels of class v % c, flag True for even v."""
    v = torch.tensor(values, dtype=torch.float32)
    keys = torch.stack([v, -v], dim=1)
    labels = torch.nn.functional.one_hot(torch.tensor(values) % c, c).float()
    return keys, labels, torch.tensor([x % 2 == 0 for x in values])


def test_queue_starts_empty_and_fills_in_order():
    q = FeatureQueue(4, 2, 3)
    keys, labels, conf, valid = q.contents()
    assert not valid.any() and not conf.any()
    torch.testing.assert_close(labels, torch.full((4, 3), 1 / 3))
    q.enqueue(*batch([1, 2]))
    keys, labels, conf, valid = q.contents()
    assert valid.tolist() == [True, True, False, False]
    assert keys[:, 0].tolist() == [1, 2, 0, 0]
    assert conf.tolist() == [False, True, False, False]
    assert labels[:2].argmax(1).tolist() == [1, 2]
    assert int(q.ptr) == 2 and int(q.filled) == 2


def test_queue_wraps_around():
    q = FeatureQueue(4, 2, 3)
    q.enqueue(*batch([1, 2, 3]))
    q.enqueue(*batch([4, 5]))  # 4 → slot 3, 5 wraps to slot 0
    keys, labels, conf, valid = q.contents()
    assert keys[:, 0].tolist() == [5, 2, 3, 4]
    assert conf.tolist() == [False, True, False, True]
    assert labels.argmax(1).tolist() == [2, 2, 0, 1]
    assert valid.all() and int(q.ptr) == 1 and int(q.filled) == 4


def test_queue_batch_larger_than_queue_keeps_last_rows_fifo():
    q = FeatureQueue(4, 2, 3)
    q.enqueue(*batch([1]))  # ptr = 1
    q.enqueue(*batch([10, 11, 12, 13, 14, 15]))  # one row at a time would leave 12..15 at slots 3,0,1,2
    assert q.contents()[0][:, 0].tolist() == [13, 14, 15, 12]
    assert int(q.ptr) == 3 and int(q.filled) == 4
    q.enqueue(*batch([20, 21, 22, 23]))  # exactly K: slots 3,0,1,2
    assert q.contents()[0][:, 0].tolist() == [21, 22, 23, 20]
    assert int(q.ptr) == 3


def test_queue_state_dict_round_trip_and_detach():
    q = FeatureQueue(3, 2, 3)
    keys, labels, conf = batch([4, 5])
    q.enqueue(keys.requires_grad_(), labels, conf)
    assert not q.keys.requires_grad
    q2 = FeatureQueue(3, 2, 3)
    q2.load_state_dict(q.state_dict())
    q2.enqueue(*batch([6, 7]))
    assert q2.contents()[0][:, 0].tolist() == [7, 5, 6] and int(q2.filled) == 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)


def test_momentum_update_and_copy_weights():
    torch.manual_seed(0)
    q_net, k_net = Net(), Net()
    w_q, w_k = q_net.lin.weight.detach().clone(), k_net.lin.weight.detach().clone()
    q_net.bn.running_mean.fill_(3.0)
    q_net.bn.num_batches_tracked.fill_(7)
    momentum_update(k_net, q_net, m=0.9)
    torch.testing.assert_close(k_net.lin.weight, 0.9 * w_k + 0.1 * w_q)
    torch.testing.assert_close(k_net.bn.running_mean, torch.full((2,), 3.0))  # buffers copied
    assert int(k_net.bn.num_batches_tracked) == 7
    assert q_net.lin.weight.equal(w_q)  # source untouched
    copy_weights(k_net, q_net)
    for (name, t), (_, s) in zip(k_net.state_dict().items(), q_net.state_dict().items(), strict=True):
        assert torch.equal(t, s), name


def test_momentum_update_rejects_missing_names():
    with pytest.raises(KeyError):
        momentum_update(Net(), nn.Linear(2, 2), m=0.9)
    # the source may have more than the target
    momentum_update(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), m=0.5)
