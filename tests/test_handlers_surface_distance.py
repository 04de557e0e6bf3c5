import pytest
import torch
from monai.data import MetaTensor
from monai.handlers import from_engine

from monai_grata.handlers import PhysicalSurfaceDistance, voxel_spacing


def box(shift: int = 0, affine=None) -> MetaTensor:
    x = torch.zeros(1, 12, 12, 6)
    x[0, 3 + shift : 9 + shift, 3:9, 1:5] = 1
    return MetaTensor(x, affine=affine if affine is not None else torch.eye(4))


def test_voxel_spacing_from_the_affine():
    affine = torch.tensor([[-0.5, 0, 0, 1], [0, -0.6, 0, 2], [0, 0, 3.0, 3], [0, 0, 0, 1]])
    assert voxel_spacing(box(affine=affine)) == pytest.approx((0.5, 0.6, 3.0))
    assert voxel_spacing(torch.zeros(1, 4, 4)) == (1.0, 1.0)


def test_assd_is_in_millimetres_at_each_images_spacing():
    fine, coarse = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0])), torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    metric = PhysicalSurfaceDistance(output_transform=from_engine(["pred", "label"]))
    metric.update(([box(1, fine), box(1, coarse)], [box(0, fine), box(0, coarse)]))
    per_image = metric.metric_fn.get_buffer()[:, 0]
    assert per_image[1] == pytest.approx(4 * per_image[0])  # the same shift of one voxel, 4x larger voxels
    assert 0 < float(per_image[0]) < 0.5  # a one-voxel shift of 0.5 mm, averaged with the faces that did not move
