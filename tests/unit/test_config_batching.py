"""Config parsing and the layout-independent data order."""

import pytest

from automodel_mimo.config import load_config
from automodel_mimo.data.batching import global_batch_indices, local_slice, split_microbatches
from automodel_mimo.errors import UserInputError


def test_overrides_are_typed_and_dp_is_inferred():
    cfg = load_config("sft", None, ["train.lr=1e-4", "launch.nproc=4", "parallel.tp=2", "model.dtype=bfloat16",
                                    "train.global_batch_size=64"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert (cfg.parallel.dp, cfg.parallel.tp) == (2, 2)
    assert cfg.model.config["model_type"] == "llama"


@pytest.mark.parametrize("override,match", [
    ("model.config=3", "model.config: expected dict"),
    ("checkpoint.resume=maybe", "checkpoint.resume: expected bool"),
    ("train.optimizer=lion", "train.optimizer=lion: use adamw or sgd"),
    ("parallel.cp=2 data.packing=true data.packed_sequence_size=130", "data.packed_sequence_size=130 must be a multiple of 4"),
    ("logging.nope=1", "unknown config key 'logging.nope'"),
    ("train", "expected dotted.key=value"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(UserInputError, match=match.replace("(", r"\(").replace("*", r"\*")):
        load_config("sft", None, override.split())


def test_global_batch_is_the_same_for_every_layout():
    """Whatever dp and micro batch size, the union of what the ranks train on is the step's global batch."""
    for step in range(5):
        batch = global_batch_indices(step, num_rows=50, global_batch_size=16, seed=3)
        assert len(set(batch)) == 16
        for dp in (1, 2, 4):
            for micro in (1, 2, 4):
                parts = [mb for r in range(dp) for mb in split_microbatches(local_slice(batch, r, dp), micro)]
                assert [i for mb in parts for i in mb] == batch


def test_epochs_cover_every_row_once_then_reshuffle():
    seen = [i for s in range(5) for i in global_batch_indices(s, num_rows=20, global_batch_size=8, seed=0)]
    assert sorted(seen[:20]) == list(range(20))  # epoch 0 is a permutation
    assert sorted(seen[20:40]) == list(range(20)) and seen[20:40] != seen[:20]
    assert global_batch_indices(3, 20, 8, 0) == global_batch_indices(3, 20, 8, 0)


def test_short_run_clamps_the_warmup_with_a_note():
    """`automodel-mimo sft train.max_steps=3` runs: the recipe's 30-step warm-up is clamped, said once."""
    notes = []
    cfg = load_config("sft", None, ["train.max_steps=3"], notes=notes)
    assert (cfg.train.max_steps, cfg.train.warmup_steps) == (3, 3)
    assert len(notes) == 1 and "train.warmup_steps=" in notes[0] and "clamped to 3" in notes[0]
    with pytest.raises(UserInputError, match="train.warmup_steps=-1"):
        load_config("sft", None, ["train.warmup_steps=-1"])


def test_synthetic_only_keys_are_noted_for_file_datasets(tmp_path):
    notes = []
    load_config("sft", None, [f"data.dataset={tmp_path}/x.jsonl"], notes=notes)
    assert notes == [f"data.num_train=9000 apply to synthetic datasets only; "
                     f"ignored for data.dataset={tmp_path}/x.jsonl"]
    notes.clear()
    load_config("sft", None, [], notes=notes)  # the synthetic default uses them
    assert notes == []
