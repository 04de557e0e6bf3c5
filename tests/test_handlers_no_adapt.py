import json

import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.networks.nets import UNet
from monai.transforms import Activationsd, AsDiscreted

from monai_grata.handlers import NoAdaptReference


def small_unet():
    torch.manual_seed(0)
    return UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch").eval()


def test_reference_pass_scores_the_source_model_before_the_run(tmp_path):
    data = [
        {"image": torch.rand(1, 16, 16), "label": (torch.rand(2, 16, 16) > 0.5).float(), "domain": d}
        for d in ("a", "a", "b")
    ]
    loader = DataLoader(Dataset(data), batch_size=1)
    post = [Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]
    dice = {"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))}
    reference = NoAdaptReference(small_unet(), post, dice, str(tmp_path), progress=None, task="fundus")
    started = []
    evaluator = SupervisedEvaluator(torch.device("cpu"), loader, small_unet(), val_handlers=[reference])
    evaluator.add_event_handler(Events.STARTED, lambda engine: started.append(dict(reference.report.summary)))
    evaluator.run()
    summary = json.loads((tmp_path / "no_adapt_metrics.json").read_text())
    assert started[0]["n_images"] == 3 and summary["n_images"] == 3 and "b/dice_mean" in summary
    assert (tmp_path / "no_adapt_per_image.csv").is_file()
    extra = reference.extra()
    assert extra["no_adapt_dice_mean"] == summary["dice_mean"] and not any("n_images" in k for k in extra)
