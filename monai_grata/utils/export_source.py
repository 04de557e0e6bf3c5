"""Export the best checkpoint of a train.json run as a shipped, half-precision source model.

python -m monai_grata.utils.export_source outputs/train_refuge_train bundles/grata/models/source_refuge_train.pt
"""

from __future__ import annotations

import argparse

from monai_grata.utils.checkpoints import export_source_model


def main() -> None:
    parser = argparse.ArgumentParser(description="Export the best checkpoint of a train.json run (half precision).")
    parser.add_argument("train_dir", help="the output_dir of the training run")
    parser.add_argument("out_path", help="the .pt file to write")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="best validation Dice or last epoch")
    args = parser.parse_args()
    print(f"exported {export_source_model(args.train_dir, args.out_path, args.which)} -> {args.out_path}")


if __name__ == "__main__":
    main()
