"""timm_icl.train.batch: the global batch, per-process batch and accumulation derived from the process count."""

import pytest

from timm_icl.train.batch import plan_batch, split_global_batch


@pytest.mark.parametrize(
    ("world", "max_per_process", "expected"),
    [(1, None, (64, 1)), (2, None, (32, 1)), (8, None, (8, 1)), (1, 16, (16, 4)), (2, 10, (8, 4)), (1, 1, (1, 64))],
)
def test_the_paper_batch_splits_over_1_2_and_8_processes(world, max_per_process, expected):
    per_process, accumulation = split_global_batch(64, world, max_per_process)
    assert (per_process, accumulation) == expected
    assert per_process * accumulation * world == 64


def test_three_processes_cannot_make_64_and_say_what_would():
    with pytest.raises(ValueError) as e:
        split_global_batch(64, 3)
    assert str(e.value) == (
        "--global-batch-size 64 does not split over 3 processes: pass 63 or 66 or run 1, 2, 4, 8, 16, 32, 64 processes"
    )
    assert split_global_batch(66, 3) == (22, 1)


def resolved(world, global_batch_size=None, batch_size=None, grad_accum_steps=1):
    plan = plan_batch(global_batch_size, batch_size, grad_accum_steps, world)
    assert plan.global_batch_size == world * plan.batch_size * plan.grad_accum_steps
    return (plan.global_batch_size, plan.batch_size, plan.grad_accum_steps), plan.describe()


def test_resolve_batch_defaults_to_the_paper_and_keeps_a_per_process_batch():
    assert resolved(1)[0] == (64, 64, 1)
    assert resolved(2) == ((64, 32, 1), "global batch 64 = 2 process(es) x 32 images x 1 accumulation step(s) "
                           "(split from --global-batch-size)")  # fmt: skip
    assert resolved(2, global_batch_size=64, batch_size=8)[0] == (64, 8, 4)  # --batch-size caps the micro-batch
    assert resolved(2, batch_size=4)[0] == (8, 4, 1)  # only --batch-size: per process, as before
    assert resolved(3, batch_size=4, grad_accum_steps=2)[0] == (24, 4, 2)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        resolved(3)
