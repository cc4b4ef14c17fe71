import json

from estable.cli import main


def test_data_shapes_writes_an_image_folder(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", str(out), "--count", "5", "--size", "32", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert all((out / r["file_name"]).is_file() and r["text"] for r in rows)


def test_data_shapes_bad_count_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "shapes", str(tmp_path / "x"), "--count", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("estable: error:") and "Traceback" not in err
