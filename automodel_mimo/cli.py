"""`automodel-mimo {sft,dpo,grpo} [--config X.yaml] [dotted.key=value ...]`

Run plainly, the command validates the config and starts `launch.nproc` ranks, each re-running this
command as a worker: local child processes (launch.backend=local) or Ray actors (launch.backend=ray). Run
under torchrun (RANK/WORLD_SIZE set), it is the worker itself, which is how multi-node jobs use it. User
errors print one line and exit 2 before any rank starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from automodel_mimo.errors import RunStopped, UserInputError
from automodel_mimo.run_lock import HELD_BY_LAUNCHER, take_output_dir

ALGOS = ("sft", "dpo", "grpo")
AVAILABLE = {"sft", "dpo", "grpo"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="automodel-mimo", description=__doc__.splitlines()[0])
    p.add_argument("algo", choices=ALGOS)
    p.add_argument("--config", help="YAML config (default: configs/<algo>_tiny.yaml, the embedded tiny run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    return p


def _preflight(cfg) -> None:
    """Cheap checks that need the tokenizer and model config, done once before ranks start."""
    from automodel_mimo.quiet import quiet_third_party

    quiet_third_party()
    from automodel_mimo.algorithms.loop import check_resume_required
    from automodel_mimo.data.file_check import check_data_files
    from automodel_mimo.models.local_paths import check_model_paths

    check_model_paths(cfg.model)  # the user's files first: one line each, before anything is loaded
    check_data_files(cfg)
    check_resume_required(cfg)
    from automodel_mimo.models.build import build_hf_config, check_tp_divisibility
    from automodel_mimo.models.tokenizer import load_tokenizer
    from automodel_mimo.parallel.pipeline_parallel import check_pipeline_split

    p = cfg.parallel
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    hf_config = build_hf_config(cfg.model, tokenizer)
    if cfg.mimo.layout:
        from automodel_mimo.mimo.preflight import check_mimo

        check_mimo(cfg, tokenizer, hf_config)
    check_tp_divisibility(hf_config, p.tp)
    check_pipeline_split(hf_config.num_hidden_layers, p.pp, p.pp_schedule, p.layers_per_stage)
    if cfg.model.pretrained and cfg.model.config:
        print(f"note: model.pretrained={cfg.model.pretrained} is used; the model.config entries are ignored", file=sys.stderr)


def _leave_process_group() -> None:
    """After the run's last barrier every rank destroys its default group, so that no rank's store client
    outlives rank 0's store (otherwise a 'recvValue failed' trace at exit on GPUs)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run_worker(cfg) -> int:
    rank = int(os.environ["RANK"])
    lock = None
    try:
        if rank == 0 and HELD_BY_LAUNCHER not in os.environ:  # torchrun: no launcher of ours holds output_dir
            lock = take_output_dir(cfg.output_dir)
        from automodel_mimo.quiet import quiet_third_party

        quiet_third_party()
        from automodel_mimo.algorithms.dpo import run_dpo
        from automodel_mimo.algorithms.grpo import run_grpo
        from automodel_mimo.algorithms.mimo_sft import run_mimo_sft_from_config
        from automodel_mimo.algorithms.sft import run_sft

        if cfg.mimo.layout:  # validate_mimo admits sft only
            run_mimo_sft_from_config(cfg)
        else:
            {"sft": run_sft, "dpo": run_dpo, "grpo": run_grpo}[cfg.algo](cfg)
        _leave_process_group()
        return 0
    except UserInputError as e:  # identical on every rank (deterministic inputs): rank 0 speaks for all
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:  # a world consensus: every rank stops at the same point, rank 0 says why
        if rank == 0:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except Exception:
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may follow --config
    if args.algo not in AVAILABLE:
        print(f"automodel-mimo {args.algo}: not available yet", file=sys.stderr)
        return 2
    from automodel_mimo.config import load_config
    from automodel_mimo.launch.local import is_worker_env

    worker = is_worker_env()
    lock = None
    try:
        try:
            cfg = load_config(args.algo, args.config, args.overrides,
                              world_size=int(os.environ["WORLD_SIZE"]) if worker else None)
            if not worker:
                lock = take_output_dir(cfg.output_dir)  # one run per output_dir, held until the ranks are gone
                _preflight(cfg)
        except UserInputError as e:
            if not worker or os.environ.get("RANK") == "0":
                print(f"error: {e}", file=sys.stderr)
            return 2
        if worker:
            return _run_worker(cfg)
        return _launch(cfg, list(argv if argv is not None else sys.argv[1:]))
    finally:
        if lock is not None:
            lock.release()


def _launch(cfg, args_list: list[str]) -> int:
    from automodel_mimo.launch.local import launch_local

    if cfg.launch.backend == "ray":
        from automodel_mimo.launch.ray_launcher import launch_ray

        return launch_ray(cfg, args_list)
    return launch_local(cfg.launch.nproc, [sys.executable, "-m", "automodel_mimo.cli", *args_list],
                        env={HELD_BY_LAUNCHER: "1"})


if __name__ == "__main__":
    sys.exit(main())
