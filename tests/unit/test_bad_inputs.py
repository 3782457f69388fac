"""Every bad input the reliability drills found: one line naming the key / file / line and the fix, exit code 2,
no traceback, and before any rank starts (no rank output, nothing left running, no output_dir left behind)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.cli_runner import TINY, run_cli


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


ROW = json.dumps({"prompt": "1+1=", "response": "2"})


def _bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("model:\n  config:\n    model_type: llama\ntrain:\n  betas: [0.9, 0.95\n  lr: 0.1\n")
    return ["--config", str(tmp / "bad.yaml")]


def _data(name: str, lines: list[str] | None = None, raw: bytes | None = None):
    def setup(tmp: Path) -> list[str]:
        path = tmp / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            _jsonl(path, lines)
        return [f"data.dataset={path}"]

    return setup


def _output_dir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("")
    return [f"output_dir={tmp / 'taken'}"]


def _output_dir_under_a_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("")
    return [f"output_dir={tmp / 'taken' / 'run'}"]


def _pretrained(kind: str):
    def setup(tmp: Path) -> list[str]:
        folder = tmp / "model"
        if kind != "missing":
            folder.mkdir()
        if kind == "not a model":
            (folder / "notes.txt").write_text("hello")
        return [f"model.pretrained={folder}"]

    return setup


CASES = {
    "invalid YAML in --config": (_bad_yaml, "bad.yaml: not valid YAML at line 6, column 5 (while parsing a flow sequence "
                                            "that starts at line 5)"),
    "invalid YAML in an override": (lambda tmp: ["train.betas=[0.9,"],
                                    "override 'train.betas=[0.9,': the value is not valid YAML"),
    "empty jsonl": (_data("empty.jsonl", raw=b""), "empty.jsonl is empty; add rows to it"),
    "blank jsonl": (_data("blank.jsonl", ["", "  "]), "blank.jsonl has no rows (only blank lines)"),
    "malformed jsonl line": (_data("broken.jsonl", [ROW, ROW, '{"prompt": "1+2=", "response": ', ROW]),
                             "broken.jsonl line 3 is not valid JSON (Expecting value at column 31); fix or remove that line"),
    "jsonl line not an object": (_data("list.jsonl", [ROW, "[1, 2]"]), "list.jsonl line 2 is a JSON list, not an object"),
    "missing columns": (_data("qa.jsonl", [json.dumps({"q": "1+1=", "a": "2"})]),
                        "data.prompt_key=prompt is not a column of {tmp}/qa.jsonl; set data.prompt_key to one of a, q"),
    "csv without rows": (_data("header.csv", raw=b"prompt,response\n"), "header.csv has a header but no rows"),
    "corrupt parquet": (_data("junk.parquet", raw=b"not parquet at all" * 10), "junk.parquet is not a readable parquet file"),
    "output_dir is a file": (_output_dir_is_a_file, "output_dir={tmp}/taken is a file, not a directory"),
    "output_dir under a file": (_output_dir_under_a_file, "output_dir={tmp}/taken/run lies under a file ({tmp}/taken)"),
    "missing model.pretrained": (_pretrained("missing"), "model.pretrained={tmp}/model: cannot load, no such file or directory"),
    "empty model.pretrained": (_pretrained("empty"), "model.pretrained={tmp}/model: cannot load, the folder is empty"),
    "model.pretrained not a model": (_pretrained("not a model"),
                                     "model.pretrained={tmp}/model: cannot load, the folder has no config.json"),
    "resume required, no checkpoint": (lambda tmp: ["checkpoint.resume=true", "checkpoint.resume_required=true"],
                                       "checkpoint.resume=true: {tmp}/out/checkpoints holds no checkpoint, and "
                                       "checkpoint.resume_required=true"),
}


def _no_process_mentions(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_before_any_rank(tmp_path, case):
    setup, expected = CASES[case]
    args = setup(tmp_path)
    out = [] if any(a.startswith("output_dir=") for a in args) else [f"output_dir={tmp_path / 'out'}"]
    r = run_cli("sft", *TINY, "launch.nproc=2", *out, *args, timeout=90)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    assert expected.format(tmp=tmp_path) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""  # no rank started (a rank prints its layout)
    assert not (tmp_path / "out").exists()  # the lock created it, and removed it again
    assert _no_process_mentions(str(tmp_path))


@pytest.fixture
def immutable_dir(tmp_path):
    """A directory nobody may write into, not even root (chattr +i), else a read-only one for a non-root user."""
    folder = tmp_path / "frozen"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no directory here is unwritable")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_unwritable_output_dir_is_one_line_before_any_rank(immutable_dir):
    r = run_cli("sft", *TINY, "launch.nproc=2", f"output_dir={immutable_dir}", timeout=90)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip() == (f"error: output_dir={immutable_dir} is not writable (Operation not permitted); choose "
                                "a writable output_dir or fix its permissions") or (
        os.geteuid() != 0 and "is not writable (Permission denied)" in r.stderr), r.stderr
    assert r.stdout == ""  # no rank started
