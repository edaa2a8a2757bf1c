"""LossByTimestep: bucketing, means, labels, and reduction across real gloo ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaletrain.train.monitor.timestep_loss import LossByTimestep


def test_bucket_means_and_edges():
    acc = LossByTimestep(4)
    acc.add(torch.tensor([0.0, 0.1, 0.3, 0.99, 1.0]), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    assert acc.summary() == {
        "loss_t/0.00-0.25": 2.0,
        "loss_t/0.25-0.50": 5.0,
        "loss_t/0.75-1.00": 8.0,  # t = 1.0 falls into the last bucket
    }
    assert acc.summary() == {}  # reset after summary


def test_where_leaves_out_non_finite_micro_batches_without_a_read_back():
    acc = LossByTimestep(2)
    t = torch.tensor([0.1, 0.9])
    acc.add(t, torch.tensor([1.0, 3.0]), where=torch.tensor(True))
    acc.add(t, torch.tensor([float("nan"), float("inf")]), where=torch.tensor(False))
    acc.add(t, torch.tensor([5.0, float("nan")]), where=torch.tensor([True, False]))
    assert acc.summary() == {"loss_t/0.0-0.5": 3.0, "loss_t/0.5-1.0": 3.0}


def test_labels_for_ten_buckets():
    assert LossByTimestep(10).labels[:2] == ["loss_t/0.0-0.1", "loss_t/0.1-0.2"]


def test_unnormalised_timesteps_are_rejected():
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        LossByTimestep(10).add(torch.tensor([0.0, 999.0]), torch.ones(2))
    with pytest.raises(ValueError, match="per_sample_loss"):
        LossByTimestep(10).add(torch.rand(3), torch.ones(2))


def test_reduce_with_custom_function():
    acc = LossByTimestep(2)
    acc.add(torch.tensor([0.2]), torch.tensor([4.0]))
    acc.reduce_(lambda totals: totals.mul_(3))  # as if 3 ranks held the same data
    assert acc.summary() == {"loss_t/0.0-0.5": 4.0}


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    acc = LossByTimestep(2)
    # rank 0 sees only early timesteps, rank 1 only late ones, with different losses
    t = torch.tensor([0.1, 0.2]) if rank == 0 else torch.tensor([0.7, 0.8, 0.9])
    acc.add(t, torch.full_like(t, float(rank + 1)))
    acc.add(torch.tensor([0.4]), torch.tensor([10.0 * (rank + 1)]))
    acc.all_reduce()
    out[rank] = acc.summary()
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_over_two_gloo_ranks():
    # fork, not spawn: the children need not import torch again (seconds on a busy CPU).
    ctx = mp.get_context("fork")
    out = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    # bucket 0: 1,1 from rank 0, 10 from rank 0, 20 from rank 1 -> 32/4; bucket 1: 2,2,2 -> 2
    expected = {"loss_t/0.0-0.5": 8.0, "loss_t/0.5-1.0": 2.0}
    assert out[0] == expected and out[1] == expected


def test_single_process_all_reduce_is_a_no_op():
    acc = LossByTimestep(2)
    acc.add(torch.tensor([0.9]), torch.tensor([3.0]))
    acc.all_reduce()
    assert acc.summary() == {"loss_t/0.5-1.0": 3.0}
