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

from automodel_mimo.errors import UserInputError

ALGOS = {
    "sft": "supervised fine-tuning (the embedded default: a tiny Llama learns 2-digit addition)",
    "dpo": "direct preference optimization (SFT warm-up, then DPO on right vs wrong sums)",
    "grpo": "group relative policy optimization with a vLLM (or hf) generator",
}
USAGE = "automodel-mimo {sft,dpo,grpo} [--config X.yaml] [dotted.key=value ...]"


def _docs_line() -> str:
    from automodel_mimo.config import CONFIG_DIR

    docs = CONFIG_DIR.parent / "docs"
    where = f"README.md and {docs}/" if docs.is_dir() else "the project's README and docs/"
    return f"Docs: {where} (numerics, pipeline parallel, packing/CP, MIMO, RL, generation, reliability)."


def _sections_text() -> str:
    """Every config section with its keys, from the schema itself (config.py holds defaults and comments)."""
    import dataclasses
    import textwrap

    from automodel_mimo.config import RunConfig

    lines = ["config sections (set in YAML or as section.key=value; defaults and comments in automodel_mimo/config.py):"]
    top = []
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            keys = ", ".join(g.name for g in dataclasses.fields(getattr(RunConfig(), f.name)))
            lines += textwrap.wrap(keys, 100, initial_indent=f"  {f.name:<11}", subsequent_indent=" " * 13)
        else:
            top.append(f.name)
    lines.insert(1, f"  {'(top)':<11}{', '.join(top)}")
    return "\n".join(lines)


def _algo_parser(algo: str) -> argparse.ArgumentParser:
    from automodel_mimo.config import default_config_path

    epilog = (f"With no --config: the embedded default {default_config_path(algo).name} (tiny model, built-in "
              f"tokenizer, synthetic data; nothing is downloaded).\n\n{_sections_text()}\n\n"
              f"Examples:\n  automodel-mimo {algo} train.max_steps=50 output_dir=outputs/try\n"
              f"  automodel-mimo {algo} --config my.yaml parallel.tp=2 launch.nproc=4\n\n{_docs_line()}")
    p = argparse.ArgumentParser(prog=f"automodel-mimo {algo}", description=f"automodel-mimo {algo}: {ALGOS[algo]}.",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config (default: configs/{algo}_tiny.yaml, the embedded tiny run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    return p


def _top_help() -> str:
    commands = "\n".join(f"  {name:<6}{text}" for name, text in ALGOS.items())
    return (f"usage: {USAGE}\n\nPost-training (SFT, DPO, GRPO) for causal LMs and MIMO (encoder + LLM) models.\n\n"
            f"commands:\n{commands}\n\n`automodel-mimo <command> --help` lists the config sections and keys; "
            "`automodel-mimo sft` alone runs the embedded default; the MIMO default is\n"
            "`automodel-mimo sft --config configs/mimo_sft_tiny.yaml`.\n" + _docs_line())


def parse_args(argv: list[str]) -> tuple[str, str | None, list[str]] | int:
    """(algo, config path, overrides), or an exit code after printing help or a usage error."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    algo = argv[0]
    if algo not in ALGOS:
        print(f"error: unknown command {algo!r}; use one of {', '.join(ALGOS)} (automodel-mimo --help)", file=sys.stderr)
        return 2
    args = _algo_parser(algo).parse_intermixed_args(argv[1:])  # overrides may follow --config
    return algo, args.config, args.overrides


def _preflight(cfg) -> None:
    """Cheap checks that need the tokenizer and model config, done once before ranks start."""
    from automodel_mimo.quiet import quiet_third_party

    quiet_third_party(cfg.logging.verbose)
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
    try:
        from automodel_mimo.quiet import quiet_third_party

        quiet_third_party(cfg.logging.verbose)
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
    except Exception:
        print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1


def main(argv: list[str] | None = None) -> int:
    parsed = parse_args(list(sys.argv[1:] if argv is None else argv))
    if isinstance(parsed, int):
        return parsed
    algo, config_path, overrides = parsed
    from automodel_mimo.config import load_config
    from automodel_mimo.launch.local import LAUNCHED_ENV, is_worker_env, launch_local

    worker = is_worker_env()
    # the launcher prints the config notes; ranks started by torchrun have no launcher, so their rank 0 does
    speaks = not worker or (os.environ.get(LAUNCHED_ENV) != "1" and os.environ.get("RANK") == "0")
    notes: list[str] = []
    try:
        cfg = load_config(algo, config_path, overrides,
                          world_size=int(os.environ["WORLD_SIZE"]) if worker else None, notes=notes)
        if not worker:
            _preflight(cfg)
    except UserInputError as e:
        if not worker or os.environ.get("RANK") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if speaks:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    if worker:
        return _run_worker(cfg)
    args_list = list(argv if argv is not None else sys.argv[1:])
    if cfg.launch.backend == "ray":
        from automodel_mimo.launch.ray_launcher import launch_ray

        return launch_ray(cfg, args_list)
    return launch_local(cfg.launch.nproc, [sys.executable, "-m", "automodel_mimo.cli", *args_list],
                        env={LAUNCHED_ENV: "1"})


if __name__ == "__main__":
    sys.exit(main())
