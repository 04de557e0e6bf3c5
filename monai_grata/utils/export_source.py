"""Export the best checkpoint of a train.json run as a shipped, half-precision source model, with the shift gate's
calibration beside it when the source data is named.

python -m monai_grata.utils.export_source outputs/train_refuge_train bundles/grata/models/source_refuge_train.pt \\
    --dataset_dir $DATA_DIR/fundus --source refuge_train
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from monai_grata.utils.calibrate_shift import add_calibration_arguments, config_overrides
from monai_grata.utils.checkpoints import export_source_model


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command (``argv``: the arguments, default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        description="Export the best checkpoint of a train.json run (half precision) and calibrate its shift gate "
        "(with --dataset_dir and --source; further --key value options override the bundle config's values).",
        allow_abbrev=False,
    )
    parser.add_argument("train_dir", help="the output_dir of the training run")
    parser.add_argument("out_path", help="the .pt file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="best validation Dice or last epoch")
    add_calibration_arguments(parser, required=False)
    args, extra = parser.parse_known_args(argv)
    if (args.dataset_dir is None) != (args.source is None):
        parser.error("calibrating the shift gate needs both --dataset_dir and --source")
    calibrate = None
    if args.dataset_dir is not None:
        calibrate = {
            "dataset_dir": args.dataset_dir, "sources": args.source, "datalist": args.datalist, "config": args.config,
            "overrides": config_overrides(extra), "split": args.split, "val_fraction": args.val_fraction,
            "seed": args.seed, "bn_prior": args.bn_prior, "device": args.device,
        }  # fmt: skip
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    chosen = export_source_model(args.train_dir, args.out_path, args.which, calibrate)
    print(f"exported {chosen} -> {args.out_path}")
    if calibrate is None:
        print(
            f"no shift calibration: run python -m monai_grata.utils.calibrate_shift --ckpt_path {args.out_path} "
            "--dataset_dir DIR --source DOMAIN"
        )


if __name__ == "__main__":
    main()
