"""The 'xtuner' LR schedule against mmengine's LinearLR + CosineAnnealingLR, step by step.

mmengine documents both schedulers in chained form: every step rescales the LR
the previous step left. ``_mmengine_chain`` replays those documented recurrences
iteration by iteration, as XTuner's ParamSchedulerHook steps them (once per
micro-batch, after the iteration's optimizer step); ``_closed_form`` is the
unrolled formula derived from them. evotune must equal both at the iteration
where each optimizer update happens.
"""

from __future__ import annotations

import math

import pytest

from evotune.train.schedule import (
    LRSchedule,
    internevo_lr,
    update_iteration,
    xtuner_iteration_lr,
    xtuner_lr,
    xtuner_warmup_micro_batches,
)


def _mmengine_chain(base, warmup, total, start, eta_min, end_factor=1.0):
    """The LR during each iteration, from mmengine's documented chained recurrences.

    LinearLR, in its range (step n from 0): lr = lr_prev * start at n = 0, else
    lr_prev * (1 + (end - start) / ((W - 1) * start + (n - 1) * (end - start))).
    CosineAnnealingLR (T_max = end - begin): lr = lr_prev at n = 0, else
    eta + (1 + cos(pi n / T)) / (1 + cos(pi (n - 1) / T)) * (lr_prev - eta).
    Outside [begin, end) a scheduler leaves the LR alone.
    """
    lr = base
    values = []
    for step in range(total):  # the global step applied before iteration `step`
        if step < warmup:
            n, span = step, warmup - 1
            if n == 0:
                lr = lr * start
            else:
                lr = lr * (
                    1 + (end_factor - start) / (span * start + (n - 1) * (end_factor - start))
                )
        if warmup <= step < total:
            n, t_max = step - warmup, total - warmup
            if n > 0:
                ratio = (1 + math.cos(math.pi * n / t_max)) / (
                    1 + math.cos(math.pi * (n - 1) / t_max)
                )
                lr = eta_min + ratio * (lr - eta_min)
        values.append(lr)
    return values


def _closed_form(iteration, base, warmup, total, start, eta_min):
    """Unrolled: factor s + (1-s) t/(W-1) in the warm-up; cosine from the LR it left."""
    if iteration < warmup:
        return base * (start + (1 - start) * iteration / (warmup - 1) if warmup > 1 else start)
    left = base * start if warmup == 1 else base
    t = iteration - warmup
    return eta_min + (left - eta_min) * (1 + math.cos(math.pi * t / (total - warmup))) / 2


LENGTHS = [
    # (iterations per epoch, epochs, warm-up ratio)
    (40, 1, 0.025),  # W = 1: the cosine starts from base * start_factor
    (80, 1, 0.025),  # W = 2
    (97, 1, 0.025),
    (400, 1, 0.025),
    (333, 3, 0.03),
    (1001, 2, 0.025),
    (12, 1, 0.5),
]


@pytest.mark.parametrize("per_epoch,epochs,ratio", LENGTHS)
@pytest.mark.parametrize("start", [1 / 40, 1e-5])
@pytest.mark.parametrize("accumulate", [1, 3, 16])
def test_xtuner_micro_batch_schedule_equals_mmengine(per_epoch, epochs, ratio, start, accumulate):
    base, eta = 4e-5, 4e-5 * 0.15
    total = per_epoch * epochs
    warmup = xtuner_warmup_micro_batches(ratio, epochs, per_epoch)
    assert warmup == int(ratio * epochs * per_epoch) and 0 < warmup < total
    chain = _mmengine_chain(base, warmup, total, start, eta)
    updates = math.ceil(total / accumulate)
    schedule = LRSchedule(
        "xtuner",
        base,
        total_steps=updates,
        eta_min=eta,
        warmup_start_factor=start,
        step_unit="micro_batch",
        accumulative_counts=accumulate,
        warmup_micro_batches=warmup,
        total_micro_batches=total,
    )
    for k in range(updates):
        iteration = min((k + 1) * accumulate, total) - 1  # the update's last micro-batch
        assert update_iteration(k, accumulate, total) == iteration
        expected = chain[iteration]
        assert schedule(k) == pytest.approx(expected, rel=1e-11, abs=0), (k, iteration)
        assert schedule(k) == pytest.approx(
            _closed_form(iteration, base, warmup, total, start, eta), rel=1e-12
        )
    assert schedule(0) == pytest.approx(chain[accumulate - 1] if accumulate <= total else chain[-1])


def test_chained_and_closed_forms_agree_on_every_iteration():
    """The derivation itself: recurrences == unrolled formula, including W = 1 and W = 2."""
    for total, warmup in [(10, 1), (10, 2), (50, 7), (3, 2)]:
        for start in (1 / 40, 1e-5, 0.5):
            chain = _mmengine_chain(1.0, warmup, total, start, 0.1)
            for i in range(total):
                assert chain[i] == pytest.approx(
                    _closed_form(i, 1.0, warmup, total, start, 0.1), rel=1e-12
                )


def test_the_check_can_fail():
    """A start factor of 1/40 where 1e-5 was asked differs from mmengine's LR."""
    chain = _mmengine_chain(1.0, 8, 100, 1e-5, 0.0)
    assert xtuner_iteration_lr(0, 1.0, 8, 100, 1 / 40, 0.0) != pytest.approx(chain[0])
    # stepping per update instead of per micro-batch also differs
    per_update = LRSchedule("xtuner", 1.0, 25, warmup_ratio=0.08, warmup_start_factor=1e-5)
    assert per_update(3) != pytest.approx(chain[3 * 4 + 3])


def test_after_the_cosine_end_the_last_value_stays():
    assert xtuner_iteration_lr(120, 1.0, 5, 100, 0.1, 0.2) == xtuner_iteration_lr(
        99, 1.0, 5, 100, 0.1, 0.2
    )


def test_update_unit_keeps_the_previous_behaviour():
    base, eta = 2e-4, 0.15 * 2e-4
    lr = [xtuner_lr(k, base, 200, 0.025, eta) for k in range(200)]
    assert lr[0] == pytest.approx(base / 40)
    assert lr[4] == pytest.approx(base) and lr[5] == pytest.approx(base)
    assert lr[199] == pytest.approx(eta + (base - eta) * (1 + math.cos(math.pi * 194 / 195)) / 2)
    schedule = LRSchedule("xtuner", base, 200, 0.025, eta)
    assert [schedule(k) for k in range(200)] == lr
    assert LRSchedule("internevo", base, 100, 0.1, 1e-5)(10) == internevo_lr(
        10, base, 100, 0.1, 1e-5
    )


def test_last_partial_accumulation_runs_at_the_last_micro_batch():
    schedule = LRSchedule(
        "xtuner",
        1.0,
        total_steps=4,
        step_unit="micro_batch",
        accumulative_counts=3,
        warmup_micro_batches=2,
        total_micro_batches=10,
    )
    assert schedule(3) == xtuner_iteration_lr(9, 1.0, 2, 10, 1 / 40, 0.0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="micro_batch"):
        LRSchedule("internevo", 1.0, 10, step_unit="micro_batch")
    with pytest.raises(ValueError, match="step_unit"):
        LRSchedule("xtuner", 1.0, 10, step_unit="epoch")
    with pytest.raises(ValueError, match="warmup_start_factor"):
        LRSchedule("xtuner", 1.0, 10, warmup_start_factor=1.5)
