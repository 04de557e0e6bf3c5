import json
import os

import pytest

from monai_grata.utils import atomic_write


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = str(tmp_path / "sub" / "metrics.json")
    with atomic_write(path) as f:
        json.dump({"dice_mean": 0.5}, f)
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write('{"dice_mean": 0.')
        raise KeyboardInterrupt
    with open(path) as f:
        assert json.load(f) == {"dice_mean": 0.5}
    assert os.listdir(tmp_path / "sub") == ["metrics.json"]
    with atomic_write(str(tmp_path / "plot.png"), "wb") as f:
        f.write(b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"


def test_make_output_dir_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    from monai_grata.data import BadInputError
    from monai_grata.utils import make_output_dir

    assert make_output_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInputError, match=r"output folder '.*file' cannot be written: File exists"):
        make_output_dir(str(tmp_path / "file"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(BadInputError, match=r"output folder '.*ro' cannot be written: Permission denied"):
        make_output_dir(str(tmp_path / "ro"))


def test_a_full_disk_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch):
    from monai_grata.utils import write_metrics

    path = str(tmp_path / "metrics.json")
    write_metrics(path, {"dice_mean": 0.5})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_metrics(path, {"dice_mean": 0.9})
    monkeypatch.undo()
    with open(path) as f:
        assert json.load(f) == {"dice_mean": 0.5}
    assert os.listdir(tmp_path) == ["metrics.json"]
