"""Metadata is in setup.cfg; this file only adds the ``.pth`` file of ``monai_grata.utils.shipped_configs``."""

import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_CONFIGS = runpy.run_path(os.path.join(HERE, "monai_grata", "utils", "shipped_configs.py"))


class BuildPyWithPth(build_py):
    """``build_py`` that also writes the ``.pth`` file at the top of the installed tree (site-packages).

    A regular install takes it from ``build_lib``; an editable install (PEP 660) only packs into its wheel what
    is under the ``install`` command's ``install_lib``, so in editable mode it is written there.
    """

    def run(self) -> None:
        super().run()
        target_dir = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, SHIPPED_CONFIGS["PTH_NAME"]), "w", encoding="utf-8") as pth_file:
            pth_file.write(SHIPPED_CONFIGS["pth_line"]())

    def get_outputs(self, include_bytecode: bool = True) -> list:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, SHIPPED_CONFIGS["PTH_NAME"]))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
