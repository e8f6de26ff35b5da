"""Frame geometry in one place: the student reports it, and its frame count is
the conv stack's, layer by layer, for ints, tensors and arrays."""

import numpy as np
import pytest
import torch

from mert_core.components import conv_output_length
from mert_core.geometry import STUDENT_GEOMETRY, TARGET_GRID, FrameGeometry, frames_for
from mert_core.model import tiny


def layer_by_layer(num_samples: int, kernels, strides) -> int:
    for kernel, stride in zip(kernels, strides):
        num_samples = conv_output_length(num_samples, kernel, stride)
    return num_samples


def test_the_preset_student_reports_the_standard_geometry():
    student = tiny()
    assert student.geometry == STUDENT_GEOMETRY == FrameGeometry(24000, 320, 400)
    assert student.geometry.frame_rate_hz == 75.0
    assert tiny(sample_rate=16000).geometry == FrameGeometry(16000, 320, 400)


@pytest.mark.parametrize("kernels, strides", [((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)), ((10, 3, 3, 3, 3, 2), (5, 2, 2, 2, 2, 2))])
def test_frame_count_equals_the_conv_stack_layer_by_layer(kernels, strides):
    student = tiny(conv_kernels=list(kernels), conv_strides=list(strides))
    g = student.geometry
    assert g.hop_samples == int(np.prod(strides))
    lengths = list(range(0, 2000)) + [24000, 24000 + 79, 24000 + 80, 120000]
    expected = [layer_by_layer(n, kernels, strides) for n in lengths]
    assert [g.num_frames(n) for n in lengths] == expected
    assert g.num_frames(torch.tensor(lengths)).tolist() == expected
    assert g.num_frames(np.array(lengths)).tolist() == expected
    assert student.num_frames(torch.tensor(lengths)).tolist() == expected
    assert int(student(torch.zeros(1, 24000 + 123)).last_hidden.shape[1]) == g.num_frames(24000 + 123)


def test_frames_for_and_bad_geometry():
    assert frames_for(399, 320, 400) == 0 and frames_for(400, 320, 400) == 1 and frames_for(720, 320, 400) == 2
    with pytest.raises(ValueError, match="positive"):
        FrameGeometry(24000, 0, 400)


# -- a longer receptive field: targets shifted onto the student's frames ----------


def test_lead_frames_put_each_target_within_a_hop_of_its_student_frame():
    cpu = student_args_geometry("cpu")
    assert (cpu.receptive_field, cpu.lead_frames, cpu.trailing_frames) == (1840, 2, 3)
    assert (STUDENT_GEOMETRY.lead_frames, STUDENT_GEOMETRY.trailing_frames) == (0, 0)
    for rf in range(TARGET_GRID.receptive_field, 6000, 40):
        g = FrameGeometry(24000, 320, rf)
        # student frame t is centred on t*hop + rf/2, the teachers' frame t + lead on (t + lead)*hop + 200
        assert abs(rf / 2 - (g.lead_frames * 320 + TARGET_GRID.receptive_field / 2)) <= 160, rf
        for n in (24000, 120000 + 77):  # every student frame has a target, and no more than the slack is left over
            teacher_frames = STUDENT_GEOMETRY.num_frames(n) - g.lead_frames
            assert 0 <= teacher_frames - g.num_frames(n) <= 1 + g.trailing_frames, (rf, n)


def student_args_geometry(preset):
    from mert_core.model import mert_student, student_args
    return mert_student(**student_args(preset)).geometry


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_a_click_is_the_target_of_the_student_frame_that_is_centred_on_it(preset):
    """The real CQT teacher through the trainer's alignment: a click at sample p peaks (top
    octave) at the target of the student frame whose receptive field is centred nearest p."""
    from mert_core.registry import default_registry
    from mert_core.trainer import student_targets

    g = student_args_geometry(preset)
    cqt = default_registry().build("teacher", "cqt", {}, geometry=g)
    num_samples = 48000
    for p in (12000, 12160, 30000):
        wave = torch.zeros(1, num_samples)
        wave[0, p] = 1.0
        num_frames = g.num_frames(num_samples)
        t = student_targets(cqt, wave, num_frames, g)[0, :num_frames]  # T, bins
        peak = int(t[:, -48:].sum(1).argmax())
        nearest = round((p - g.receptive_field / 2) / g.hop_samples)
        assert abs(peak - nearest) <= 1, (preset, p, peak, nearest)


def test_a_teacher_makes_targets_on_the_target_grid_unless_it_follows_the_student():
    from mert_core.geometry import TARGET_GRID, GridShift
    from mert_core.registry import default_registry

    cpu = FrameGeometry(24000, 320, 1840)
    cqt = default_registry().build("teacher", "cqt", {}, geometry=cpu)
    ema = default_registry().build("teacher", "ema", {}, geometry=cpu)
    assert cqt.geometry == cpu and cqt.grid == TARGET_GRID == cpu.target_grid
    assert ema.grid == cpu
    assert cpu.shift_from(cqt.grid) == GridShift(cpu.lead_frames, cpu.trailing_frames) == GridShift(2, 3)
    assert cpu.shift_from(ema.grid) == GridShift(0, 0)
    with pytest.raises(ValueError, match="hop must agree"):
        cpu.shift_from(FrameGeometry(16000, 320, 400))
