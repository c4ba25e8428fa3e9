"""FastLinear's layouts: the three products agree, the fastest is measured once per shape and row
bucket and then kept (the same rows always meet the same rounding)."""

from __future__ import annotations

import torch

from blockpilot.models.layers import FastLinear, MatmulLayouts


def test_buckets_are_powers_of_two():
    assert [MatmulLayouts.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


def test_every_layout_computes_the_same_product():
    linear = FastLinear(24, 40, bias=True).requires_grad_(False)
    linear.prepare_for_inference(MatmulLayouts())
    x = torch.randn(5, 24)
    expected = torch.nn.functional.linear(x, linear.weight)
    for layout in MatmulLayouts.LAYOUTS:
        torch.testing.assert_close(MatmulLayouts.apply(layout, linear, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x[None]), (expected + linear.bias)[None], rtol=1e-5, atol=1e-5)


def test_the_choice_is_measured_once_per_bucket_and_kept(monkeypatch):
    layouts = MatmulLayouts(reps=2)
    linear = FastLinear(16, 8).requires_grad_(False)
    linear.prepare_for_inference(layouts)
    measured = []
    original = layouts._measure
    monkeypatch.setattr(layouts, "_measure", lambda key, module, flat: measured.append(key) or original(key, module, flat))
    with torch.inference_mode():
        first = linear(torch.randn(3, 16))
        for rows in (3, 4, 3, 1, 1, 2):
            linear(torch.randn(rows, 16))
    assert [key[-1] for key in measured] == [4, 1, 2]  # rows 3 and 4 share a bucket
    assert set(layouts.choices.values()) <= set(MatmulLayouts.LAYOUTS)
    assert all(set(t) == set(MatmulLayouts.LAYOUTS) for t in layouts.timings_ms.values())
    assert first.shape == (3, 8)


def test_an_unprepared_or_training_linear_uses_f_linear():
    linear = FastLinear(6, 4)
    x = torch.randn(2, 6)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight))
    assert linear(x).requires_grad
