import json

import pytest
import torch

from monai_grata.data import FUNDUS, SPINALCORD, TaskSpec, task_by_name, task_of_bundle
from monai_grata.transforms import StrongIntensityAug, WeakViews
from monai_grata.tta import adapter_class


def test_the_shipped_bundles_name_their_tasks():
    assert task_of_bundle("bundles/grata") is FUNDUS
    assert task_of_bundle("bundles/spinalcord_gm/") is SPINALCORD
    assert FUNDUS.channels == ("od", "oc") and FUNDUS.multilabel and FUNDUS.spatial_dims == 2
    assert SPINALCORD.channels == ("cord", "gm") and not SPINALCORD.multilabel and SPINALCORD.spatial_dims == 3
    assert task_by_name("spinalcord") is SPINALCORD
    with pytest.raises(KeyError, match="unknown task"):
        task_by_name("retina")


def test_a_bundle_metadata_names_its_task(tmp_path):
    (tmp_path / "configs").mkdir()
    with pytest.raises(ValueError, match="task_spec"):
        task_of_bundle(str(tmp_path))
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps({"task_spec": "spinalcord"}))
    assert task_of_bundle(str(tmp_path)) is SPINALCORD


def test_bad_specs_are_named():
    fields = dict(FUNDUS.__dict__)
    with pytest.raises(ValueError, match="activation"):
        TaskSpec(**{**fields, "activation": "relu"})
    with pytest.raises(ValueError, match="view_axes"):
        TaskSpec(**{**fields, "view_axes": (-3, -2)})  # a 2D task has no axis -3
    with pytest.raises(ValueError, match="to_label_grid"):
        TaskSpec(**{**fields, "to_label_grid": "crop"})


def test_sigmoid_thresholds_and_softmax_decodes_through_the_label_codec():
    logits = torch.tensor([[[[2.0, -2.0]], [[-2.0, 2.0]]]])  # (1, 2, 1, 2)
    assert FUNDUS.discretise(FUNDUS.probabilities(logits)[0]).tolist() == [[[1.0, 0.0]], [[0.0, 1.0]]]
    # softmax classes 0 background, 1 outer only, 2 inner: channels [outer incl. inner, inner]
    logits = torch.tensor([[[[5.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], [[0.0, 0.0, 5.0]]]])  # (1, 3, 1, 3)
    channels = SPINALCORD.discretise(SPINALCORD.probabilities(logits)[0])
    assert channels.tolist() == [[[0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0]]]
    assert SPINALCORD.channels_to_label(channels).tolist() == [[[0, 1, 2]]]


def test_adapter_options_follow_the_task_and_never_touch_the_slice_axis():
    assert FUNDUS.adapter_options(adapter_class("grata")) == {"multilabel": True}
    grata = SPINALCORD.adapter_options(adapter_class("grata"), seed=3)
    assert grata["multilabel"] is False
    assert isinstance(grata["strong_transform"], StrongIntensityAug)
    volume = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(1, 2, 4, 4, 3)
    views = WeakViews(grata["views"])(volume)  # every view keeps slice k of the volume in slice k
    for view in views:
        for k in range(3):
            assert sorted(view[..., k].flatten().tolist()) == sorted(volume[..., k].flatten().tolist())
    assert SPINALCORD.adapter_options(adapter_class("dua")) == {"plane": (-3, -2)}
    assert "multilabel" not in SPINALCORD.adapter_options(adapter_class("norm"))


def test_preprocessing_takes_only_the_arguments_it_knows():
    assert FUNDUS.make_preprocessing(image_size=64, pixdim=(1, 1, 1)) is not None
    assert SPINALCORD.make_preprocessing(image_size=64) is not None


def test_the_label_codecs_round_trip_and_the_spinal_cord_decodes_without_a_fundus_transform():
    label = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    for task in (FUNDUS, SPINALCORD):
        assert torch.equal(task.channels_to_label(task.label_to_channels(label)), label.to(torch.uint8))
    assert "DiscCup" not in type(SPINALCORD.channels_to_label).__name__
    with pytest.raises(ValueError, match=r"expected 2 channels \[cord, gray matter\]"):
        SPINALCORD.channels_to_label(torch.zeros(3, 2, 2))


def test_a_bad_label_value_is_named_with_the_task_structures():
    with pytest.raises(ValueError, match="1 white matter, 2 gray matter"):
        SPINALCORD.label_to_channels(torch.tensor([[[0, 3]]]))
    with pytest.raises(ValueError, match="1 optic disc rim, 2 optic cup"):
        FUNDUS.label_to_channels(torch.tensor([[[0, 255]]]))
