"""A local jsonl dataset (prompt/response pairs) goes through `datasets` and trains for 2 steps."""

import json

from tests.unit.cli_runner import TINY, metrics, run_cli


def test_jsonl_dataset_trains_two_steps(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"question": f"{a} plus {a}?", "answer": str(2 * a)} for a in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    r = run_cli("sft", *TINY, f"output_dir={out}", f"data.dataset={data}", "data.prompt_key=question",
                "data.response_key=answer", "data.eval_fraction=0.1", "train.max_steps=2", "launch.nproc=1",
                "eval.every_steps=2", "checkpoint.export_hf=false")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(out)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert all(row["loss"] > 0 and row["tokens"] > 0 for row in rows if "loss" in row)
    assert any("eval/accuracy" in row for row in rows)
