"""Ray launcher (`launch.backend=ray`): one Ray actor per rank, placed by a placement group, each running the
same SPMD entry as a local rank (`automodel_mimo.cli.main` with RANK / WORLD_SIZE / MASTER_* set).

The rendezvous is rank 0's actor: its node address and a free port there become MASTER_ADDR / MASTER_PORT.
Without `launch.ray_address` a local Ray instance is started with just enough logical CPUs (one per rank,
plus generation.num_cpus for a disaggregated generator actor, which rank 0 creates); with it, the job
joins that cluster. As with the local launcher, the first rank to fail stops the others.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from automodel_mimo.config import RunConfig
from automodel_mimo.launch.local import LAUNCHED_ENV

_POLL_S = 0.5
_LOG_FLUSH_S = 1.0


class RankActor:
    """One SPMD rank inside Ray."""

    def address(self) -> tuple[str, int]:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, entry: Callable[[list[str]], int], argv: list[str], env: dict[str, str]) -> int:
        os.environ.update(env)
        return entry(argv)


def _uses_gpus(cfg: RunConfig) -> bool:
    import torch

    return cfg.launch.dist_backend == "nccl" or (cfg.launch.dist_backend == "auto" and torch.cuda.is_available())


def launch_ray(cfg: RunConfig, argv: list[str], entry: Callable[[list[str]], int]) -> int:
    """Run `entry(argv)` (the CLI's main with its own arguments: the same SPMD entry as a local rank) as
    cfg.launch.nproc Ray actors; returns 0 or the first failing rank's exit code."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = cfg.launch.nproc
    gpus = 1 if _uses_gpus(cfg) else 0
    started = not ray.is_initialized()
    if started:
        extra = 0 if cfg.algo != "grpo" or cfg.generation.colocated else cfg.generation.num_cpus
        kwargs = {"address": cfg.launch.ray_address} if cfg.launch.ray_address else {"num_cpus": n + extra}
        # The workers import this package (and `policies`) from the same tree as the driver.
        root = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    pg = placement_group([{"CPU": 1, **({"GPU": 1} if gpus else {})}] * n, strategy="PACK")
    actors = []
    try:
        ray.get(pg.ready())
        actors = [ray.remote(RankActor).options(
            num_cpus=1, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
            for i in range(n)]
        host, port = ray.get(actors[0].address.remote())
        shared = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
                  LAUNCHED_ENV: "1"}  # also: this driver holds output_dir's lock, the ranks do not take it
        runs = {actors[i].run.remote(entry, argv, {**shared, "RANK": str(i), "LOCAL_RANK": "0" if gpus else str(i)}): i
                for i in range(n)}
        return _supervise(runs)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)
        if started:
            ray.shutdown()


def _supervise(runs: dict, grace_s: float = 5.0) -> int:
    """Wait for every rank. After the first non-zero exit (or actor death) the others get `grace_s` to finish
    on their own (a user error is raised on every rank, and rank 0 is the one that prints it) before the
    caller kills them; the returned code is the first failure's."""
    import ray

    pending, failure = list(runs), None
    deadline = None
    while pending and (deadline is None or time.monotonic() < deadline):
        done, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
        for ref in done:
            try:
                rc, why = ray.get(ref), None
            except ray.exceptions.RayError as e:
                rc, why = 1, f"died ({type(e).__name__})"
            if rc != 0 and failure is None:
                failure = rc
                deadline = time.monotonic() + grace_s
                print(f"[launcher] rank {runs[ref]} {why or f'failed (exit code {rc})'}; stopping the other ranks",
                      file=sys.stderr, flush=True)
    if failure is not None:
        time.sleep(_LOG_FLUSH_S)  # Ray forwards the ranks' output asynchronously: let their last lines arrive
    return failure or 0
