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
import time
import traceback

from automodel_mimo.errors import RunStopped, UserInputError
from automodel_mimo.run.lock import take_output_dir

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

    lines = ["config sections (set in YAML or as section.key=value; defaults and comments in automodel_mimo/config/schema.py):"]
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
    """Checks of the user's files and of the model's shape, done once before ranks start. Kept to the standard
    library where the config allows (models/facts.py): a bad layout is one line in about a second."""
    from automodel_mimo.run.quiet import quiet_third_party

    quiet_third_party(cfg.logging.verbose)  # before anything below imports a library
    from automodel_mimo.checkpoint.listing import check_resume_required
    from automodel_mimo.data.file_check import check_data_files
    from automodel_mimo.models.facts import check_expert_split, check_pipeline_split, check_tp_divisibility, quick_facts
    from automodel_mimo.models.local_paths import check_model_paths

    check_model_paths(cfg.model)  # the user's files first: one line each, before anything is loaded
    check_data_files(cfg)
    check_resume_required(cfg)
    p = cfg.parallel
    # a dpo.reference folder is compared with the model's full HF config (transformers' defaults included)
    slow = cfg.mimo.layout or cfg.model.tokenizer or _reference_folder(cfg)
    facts = None if slow else quick_facts(cfg.model)
    if facts is None:  # transformers reads the config (and the tokenizer)
        facts = _model_config(cfg)
    elif not cfg.model.pretrained:
        _check_vocab(facts.vocab_size)
    check_tp_divisibility(facts, p.tp)
    check_expert_split(facts, p.ep)
    check_pipeline_split(facts.num_hidden_layers, p.pp, p.pp_schedule, p.layers_per_stage)
    if cfg.model.pretrained and cfg.model.config:
        print(f"note: model.pretrained={cfg.model.pretrained} is used; the model.config entries are ignored", file=sys.stderr)
    if cfg.mimo.layout and cfg.model.pretrained and cfg.mimo.encoder:
        print(f"note: the LLaVA folder model.pretrained={cfg.model.pretrained} holds the vision tower; the mimo.encoder "
              "entries are ignored", file=sys.stderr)


def _model_config(cfg):
    """The LLM's HF config through transformers, and the MIMO checks that need the tokenizer."""
    from automodel_mimo.models.build import build_hf_config
    from automodel_mimo.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    hf_config = build_hf_config(cfg.model, tokenizer)
    if cfg.mimo.layout:
        from automodel_mimo.mimo.preflight import check_mimo

        check_mimo(cfg, tokenizer, hf_config)
        hf_config = getattr(hf_config, "text_config", hf_config)  # a LLaVA folder: its LLM
    elif _reference_folder(cfg):
        _check_lm_reference(cfg.dpo.reference, hf_config)
    return hf_config


def _reference_folder(cfg) -> bool:
    return cfg.algo == "dpo" and cfg.dpo.reference != "initial"


def _check_lm_reference(path: str, hf_config) -> None:
    """dpo.reference=<folder> of a causal LM: a loadable config whose model has the run's parameter shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_mimo.models.reference_shapes import check_reference_shapes

    try:
        reference = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserInputError(f"dpo.reference={path}: cannot load its config ({detail})") from None
    check_reference_shapes("dpo.reference", path, reference, hf_config, AutoModelForCausalLM.from_config)


def _check_vocab(vocab_size: int | None) -> None:
    """A random-init model.config with the built-in tokenizer: its vocabulary must hold every token id."""
    from automodel_mimo.models.tokenizer import BUILTIN_VOCAB_SIZE

    if vocab_size is not None and vocab_size < BUILTIN_VOCAB_SIZE:
        raise UserInputError(f"model.config.vocab_size={vocab_size} is smaller than the tokenizer "
                             f"({BUILTIN_VOCAB_SIZE} tokens)")


def _leave_process_group() -> None:
    """After the run's last barrier every rank destroys its default group, so that no rank's store client
    outlives rank 0's store (otherwise a 'recvValue failed' trace at exit on GPUs)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def _lost_a_peer(error: BaseException) -> bool:
    """A collective (or the rendezvous) failed because another rank's process went away (gloo / NCCL / store
    messages)."""
    while error is not None:
        if type(error).__name__ == "DistNetworkError" or any(phrase in str(error) for phrase in _PEER_GONE):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


_CHECK_OUT_KEY, _CHECK_OUT_S = "automodel_mimo/stopped", 10.0


def _check_out(rank: int) -> None:
    """An error every rank raises (UserInputError, RunStopped), each rank at its own pace: every rank checks out
    at the job's store, and rank 0, whose process serves that store, leaves last (within _CHECK_OUT_S). Were it
    to leave first, a rank still in a rendezvous would die of the lost store instead of reaching the error."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(_CHECK_OUT_KEY, 1)
        deadline = time.monotonic() + _CHECK_OUT_S
        while rank == 0 and store.add(_CHECK_OUT_KEY, 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # the store is gone: nobody is left to wait for
        pass


def _run_worker(cfg) -> int:
    from automodel_mimo.launch.local import LAUNCHED_ENV

    rank = int(os.environ["RANK"])
    lock = None
    try:
        if rank == 0 and os.environ.get(LAUNCHED_ENV) != "1":  # torchrun: no launcher of ours holds output_dir
            lock = take_output_dir(cfg.output_dir)
        from automodel_mimo.run.quiet import quiet_third_party

        quiet_third_party(cfg.logging.verbose)
        from automodel_mimo.algorithms.dpo import run_dpo
        from automodel_mimo.algorithms.grpo import run_grpo
        from automodel_mimo.algorithms.sft import run_sft

        {"sft": run_sft, "dpo": run_dpo, "grpo": run_grpo}[cfg.algo](cfg)
        _leave_process_group()
        return 0
    except UserInputError as e:  # identical on every rank (deterministic inputs): rank 0 speaks for all
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _check_out(rank)
        return 2
    except RunStopped as e:  # a world consensus: every rank stops at the same point, rank 0 says why
        if rank == 0:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
        _check_out(rank)
        return 3
    except Exception as e:
        if _lost_a_peer(e):  # the rank that failed first has printed why; a second traceback would bury it
            print(f"[rank {rank}] stopped: lost the connection to another rank, which failed or was killed "
                  f"({_first_line(e)})", file=sys.stderr, flush=True)
        else:
            print(f"[rank {rank}] failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    if rc != 0 and not _is_rank():  # the launcher: its ranks are gone (or never started), nothing is left to do
        _exit_now(rc)
    return rc


def _is_rank() -> bool:
    from automodel_mimo.launch.local import is_worker_env

    return is_worker_env()


def _exit_now(rc: int) -> None:
    """Leave without the interpreter's teardown, which takes seconds once torch is loaded: after a failure
    nothing is left to save (logs are closed, the lock released), and a launcher (or the user) waits on this
    exit. Not for Ray actors, which call main() and must return."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _main(argv: list[str] | None) -> int:
    parsed = parse_args(list(sys.argv[1:] if argv is None else argv))
    if isinstance(parsed, int):
        return parsed
    algo, config_path, overrides = parsed
    from automodel_mimo.config import load_config
    from automodel_mimo.launch.local import LAUNCHED_ENV, is_worker_env

    worker = is_worker_env()
    # the launcher prints the config notes; ranks started by torchrun have no launcher, so their rank 0 does
    speaks = not worker or (os.environ.get(LAUNCHED_ENV) != "1" and os.environ.get("RANK") == "0")
    notes: list[str] = []
    lock = None
    try:
        try:
            cfg = load_config(algo, config_path, overrides,
                              world_size=int(os.environ["WORLD_SIZE"]) if worker else None, notes=notes)
            if not worker:
                lock = take_output_dir(cfg.output_dir)  # one run per output_dir, held until the ranks are gone
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
        return _launch(cfg, list(argv if argv is not None else sys.argv[1:]))
    finally:
        if lock is not None:
            lock.release()


def _launch(cfg, args_list: list[str]) -> int:
    from automodel_mimo.launch.local import LAUNCHED_ENV, launch_local

    if cfg.launch.backend == "ray":
        from automodel_mimo.launch.ray_launcher import launch_ray

        return launch_ray(cfg, args_list, main)
    return launch_local(cfg.launch.nproc, [sys.executable, "-m", "automodel_mimo.cli", *args_list],
                        env={LAUNCHED_ENV: "1"}, agreed_exit_codes=(2, 3))


if __name__ == "__main__":
    code = main()
    if code != 0:  # a failed rank: the launcher notices at once, not after seconds of teardown
        _exit_now(code)
    sys.exit(code)
