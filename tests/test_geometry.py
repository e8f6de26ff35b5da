"""Frame geometry in one place: the student reports it, and its frame count is
the conv stack's, layer by layer, for ints, tensors and arrays."""

import numpy as np
import pytest
import torch

from mert_core.components import conv_output_length
from mert_core.geometry import STUDENT_GEOMETRY, FrameGeometry, frames_for
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
