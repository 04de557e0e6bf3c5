import pytest

from monai_grata.data import domain_datalist
from monai_grata.engines import job_step
from monai_grata.utils import make_output_dir


def test_a_bad_input_ends_the_job_step_with_one_line(tmp_path):
    (tmp_path / "site" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit) as info:
        job_step(domain_datalist, str(tmp_path), "site")
    assert str(info.value.code).startswith("error: empty dataset: ") and "\n" not in info.value.code
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no traceback of the cause
    with pytest.raises(SystemExit, match="^error: image folder not found"):
        job_step(domain_datalist, str(tmp_path), "absent")


def test_a_job_step_returns_what_the_function_returns_and_lets_other_errors_pass(tmp_path):
    assert job_step(make_output_dir, str(tmp_path / "out")) == str(tmp_path / "out")
    with pytest.raises(ZeroDivisionError):
        job_step(lambda: 1 / 0)
