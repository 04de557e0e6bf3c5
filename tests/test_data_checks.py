import subprocess
import sys

import pytest
from torch.utils.data import DataLoader

from monai_grata.data import BadInputError, MissingInputError, check_loader, domain_datalist


def test_check_loader_names_the_numbers_and_the_option():
    loader = DataLoader(list(range(6)), batch_size=8, drop_last=True)
    with pytest.raises(BadInputError, match=r"the training split has 6 images.*pass --batch_size 6 or less"):
        check_loader(loader, "the training split")
    fits = DataLoader(list(range(6)), batch_size=8)
    assert check_loader(fits, "the training split") is fits
    with pytest.raises(BadInputError, match="no images in the target domain"):
        check_loader(DataLoader([], batch_size=1), "the target domain")


def test_missing_input_is_a_file_not_found_error(tmp_path):
    with pytest.raises(MissingInputError) as info:
        domain_datalist(str(tmp_path), "site", str(tmp_path / "absent.json"))
    assert isinstance(info.value, FileNotFoundError)


def test_bad_input_is_reported_in_one_line_without_traceback():
    code = (
        "from monai_grata.data import BadInputError, report_bad_input_briefly\n"
        "report_bad_input_briefly()\n"
        "try:\n    raise BadInputError('image a.png: unreadable')\n"
        "except BadInputError as e:\n    raise RuntimeError('Failed to evaluate') from e\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr == "error: image a.png: unreadable\n"
    run = subprocess.run([sys.executable, "-c", code.replace("BadInputError('", "KeyError('")], capture_output=True)
    assert run.returncode == 1 and b"Traceback" in run.stderr
