"""Launchers: the command line (argv) and environment that start one stage process.

Every function here is pure: it takes the run config, the stage, the resolved config file and (where
relevant) an environment mapping, and returns an argv list or an environment dict. The orchestrator
(``pipeline/orchestrator.py``) runs them on this machine; ``pipeline/slurm.py`` writes them into batch
scripts, where the rendezvous values are shell variables set inside the allocation.

Launchers (``launch.launcher`` in the config):

- ``local``: one process, ``python -m stages STAGE --config FILE``.
- ``torchrun``: ``python -m torch.distributed.run`` with ``nproc_per_node`` processes per node. One node
  uses ``--standalone`` (a free local port) unless a master address is given; several nodes use the
  ``c10d`` (or ``static``) rendezvous at ``master_addr:master_port``.
- ``deepspeed``: ``python -m deepspeed.launcher.runner --module`` (``--no_local_rank``: ranks read
  ``LOCAL_RANK`` from the environment). Several nodes run one launcher per node (``--no_ssh``) with
  ``--node_rank``, which is how it runs under ``srun``.

Rendezvous values come from the config when set there explicitly, otherwise from the environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``NNODES``/``SLURM_JOB_NUM_NODES``, ``NODE_RANK``/``SLURM_NODEID``),
otherwise from the config defaults.

The module that is started is ``stages`` by default. ``ALIGNPIPE_STAGE_ENTRY`` (environment) or the
``entry`` argument names another module with the same command line (``MODULE STAGE --config FILE``);
the tests use it to run quick fake stages through the real launchers and Slurm.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT, ConfigError, RunConfig

ENTRY_ENV = "ALIGNPIPE_STAGE_ENTRY"
DEFAULT_ENTRY = "stages"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a multi-process stage meet. ``node_rank`` is this node's index."""

    master_addr: str
    master_port: int | str
    nnodes: int | str
    node_rank: int | str
    explicit_addr: bool  # a master address was given (config or environment), not defaulted


def entry_module(entry: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The Python module a stage process runs: ``entry``, else $ALIGNPIPE_STAGE_ENTRY, else ``stages``."""
    env = os.environ if env is None else env
    module = entry or env.get(ENTRY_ENV) or DEFAULT_ENTRY
    if not all(part.isidentifier() for part in module.split(".")):
        raise ConfigError(f"stage entry module {module!r} (from {ENTRY_ENV} or entry=) is not a Python module name")
    return module


def stage_args(stage: str, config_file: str | os.PathLike, entry: str | None = None,
               env: Mapping[str, str] | None = None) -> list[str]:
    """The part after the interpreter: ``-m stages STAGE --config FILE``."""
    return ["-m", entry_module(entry, env), stage, "--config", str(config_file)]


def rendezvous(cfg: RunConfig, env: Mapping[str, str] | None = None) -> Rendezvous:
    """Resolve master address/port, node count and node rank: explicit config > environment > Slurm's job
    (the first host of its node list, a port from its id: ``slurm_master_addr``, ``slurm_job_port``; the
    address only for several nodes, one node runs torchrun ``--standalone``) > defaults."""
    env = os.environ if env is None else env
    launch = cfg.launch
    given = launch.model_fields_set
    if "nnodes" in given:
        nnodes: int | str = launch.nnodes
    else:
        nnodes = (_int_env(env, "NNODES") or _int_env(env, "SLURM_JOB_NUM_NODES") or _int_env(env, "SLURM_NNODES")
                  or launch.nnodes)
    node_rank: int | str = _int_env(env, "NODE_RANK")
    if node_rank is None:
        node_rank = _int_env(env, "SLURM_NODEID") or 0
    if "master_addr" in given and launch.master_addr:
        addr, explicit = launch.master_addr, True
    elif env.get("MASTER_ADDR"):
        addr, explicit = env["MASTER_ADDR"], True
    elif str(nnodes) != "1" and slurm_master_addr(env) is not None:
        addr, explicit = slurm_master_addr(env), True
    else:
        addr, explicit = "127.0.0.1", False
    if "master_port" in given:
        port: int | str = launch.master_port
    else:
        port = _int_env(env, "MASTER_PORT") or slurm_job_port(env) or launch.master_port
    return Rendezvous(addr, port, nnodes, node_rank, explicit)


# ---------------------------------------------------------------------------------------------- Slurm
#: Ports derived from a Slurm job id: below Linux's ephemeral range (32768-60999), above the common services.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


def slurm_port(job_id: int | str) -> int:
    """The rendezvous port of a Slurm job: the same on every node of the job (no agreement needed), and
    different for jobs whose ids differ by less than ``SLURM_PORT_SPAN`` (two jobs sharing a node)."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def slurm_job_port(env: Mapping[str, str]) -> int | None:
    """Inside a Slurm job: the rendezvous port of ``SLURM_JOB_ID`` (``slurm_port``); None outside one."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    return slurm_port(job_id) if job_id.isdigit() else None


@functools.lru_cache(maxsize=8)
def _first_host(hostlist: str) -> str:
    return expand_hostlist(hostlist)[0]


def slurm_master_addr(env: Mapping[str, str]) -> str | None:
    """Inside a Slurm job: the first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``), the node whose
    rank 0 hosts the rendezvous; None outside one."""
    hostlist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return _first_host(hostlist) if hostlist else None


def expand_hostlist(hostlist: str, use_scontrol: bool = True) -> list[str]:
    """Slurm's compact host list (``node[01-03,07],gpu5``) -> host names, by ``scontrol show hostnames`` when
    it is on PATH (``use_scontrol``), else by ``parse_hostlist``."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            done = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    return parse_hostlist(hostlist)


def parse_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list without Slurm: comma-separated entries, each with any number of bracketed
    ranges (``node[01-03,07]``, ``rack[1-2]-n[1-2]``); a range keeps the zero padding of its start."""
    hosts: list[str] = []
    for entry in _split_outside_brackets(hostlist.strip()):
        hosts += _expand_entry(entry, hostlist)
    if not hosts:
        raise ConfigError(f"host list {hostlist!r} names no host")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    entries, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    return [e for e in [*entries, current] if e]


def _expand_entry(entry: str, hostlist: str) -> list[str]:
    """``prefix[ranges]rest`` -> every prefix + value + expansion of rest."""
    match = re.search(r"\[([^\[\]]*)\]", entry)
    if match is None:
        if "[" in entry or "]" in entry:
            raise ConfigError(f"host list {hostlist!r}: unbalanced brackets in {entry!r}")
        return [entry]
    values: list[str] = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ConfigError(f"host list {hostlist!r}: {part!r} is not a number or a range like 01-03")
        values += [f"{n:0{len(low)}d}" for n in range(int(low), int(high or low) + 1)]
    rests = _expand_entry(entry[match.end():], hostlist) if entry[match.end():] else [""]
    return [entry[:match.start()] + value + rest for value in values for rest in rests]


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def local_command(stage: str, config_file: str | os.PathLike, python: str | None = None,
                  entry: str | None = None, env: Mapping[str, str] | None = None) -> list[str]:
    """One process: ``python -m stages STAGE --config FILE``."""
    return [python or sys.executable, *stage_args(stage, config_file, entry, env)]


def torchrun_command(cfg: RunConfig, stage: str, config_file: str | os.PathLike, python: str | None = None,
                     entry: str | None = None, env: Mapping[str, str] | None = None,
                     rdzv: Rendezvous | None = None) -> list[str]:
    """``python -m torch.distributed.run`` with ``launch.nproc_per_node`` ranks per node."""
    rdzv = rdzv or rendezvous(cfg, env)
    launch = cfg.launch
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc_per_node)]
    single_node = str(rdzv.nnodes) == "1"
    if single_node and not rdzv.explicit_addr:
        cmd += ["--standalone"]
    elif launch.rdzv_backend == "static":
        cmd += ["--nnodes", str(rdzv.nnodes), "--node_rank", str(rdzv.node_rank),
                "--master_addr", str(rdzv.master_addr), "--master_port", str(rdzv.master_port)]
    else:
        cmd += ["--nnodes", str(rdzv.nnodes), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{rdzv.master_addr}:{rdzv.master_port}",
                "--rdzv_id", f"{cfg.run_name}-{stage}"]
    return cmd + stage_args(stage, config_file, entry, env)


def deepspeed_command(cfg: RunConfig, stage: str, config_file: str | os.PathLike, python: str | None = None,
                      entry: str | None = None, env: Mapping[str, str] | None = None,
                      rdzv: Rendezvous | None = None) -> list[str]:
    """``python -m deepspeed.launcher.runner --module`` with ``launch.nproc_per_node`` ranks per node."""
    rdzv = rdzv or rendezvous(cfg, env)
    cmd = [python or sys.executable, "-m", "deepspeed.launcher.runner",
           "--num_gpus", str(cfg.launch.nproc_per_node),
           "--master_addr", str(rdzv.master_addr), "--master_port", str(rdzv.master_port)]
    if str(rdzv.nnodes) != "1":
        # one launcher per node (started by srun), no ssh/pdsh fan-out
        cmd += ["--num_nodes", str(rdzv.nnodes), "--node_rank", str(rdzv.node_rank), "--no_ssh"]
    cmd += ["--no_local_rank", "--module", entry_module(entry, env), stage, "--config", str(config_file)]
    return cmd


def stage_command(cfg: RunConfig, stage: str, config_file: str | os.PathLike, python: str | None = None,
                  entry: str | None = None, env: Mapping[str, str] | None = None,
                  rdzv: Rendezvous | None = None) -> list[str]:
    """The argv that starts ``stage`` with the launcher the config names (``launch.launcher``)."""
    launch = cfg.launch
    if launch.launcher == "local":
        if launch.nproc_per_node != 1 or launch.nnodes != 1:
            raise ConfigError(
                f"launch.launcher='local' starts one process, but launch.nproc_per_node={launch.nproc_per_node} "
                f"and launch.nnodes={launch.nnodes}; set launch.launcher=torchrun or launch.launcher=deepspeed"
            )
        return local_command(stage, config_file, python, entry, env)
    if launch.launcher == "torchrun":
        return torchrun_command(cfg, stage, config_file, python, entry, env, rdzv)
    if launch.launcher == "deepspeed":
        return deepspeed_command(cfg, stage, config_file, python, entry, env, rdzv)
    raise ConfigError(f"launch.launcher={launch.launcher!r} is not one of local, torchrun, deepspeed")


def stage_env(cfg: RunConfig, base: Mapping[str, str] | None = None, cpu: bool = True) -> dict[str, str]:
    """Environment of a stage process: ``base`` plus the repo on PYTHONPATH and, on CPU, DS_ACCELERATOR=cpu
    and the thread settings of ``cpu_thread_env`` (variables ``base`` already sets are kept)."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
        for key, value in cpu_thread_env(cfg.launch.cpu_wait_policy, cfg.launch.cpu_threads,
                                         cfg.launch.nproc_per_node).items():
            env.setdefault(key, value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def cpu_thread_env(wait_policy: str = "passive", threads: int | str = "available",
                   processes: int = 1) -> dict[str, str]:
    """OpenMP settings for a CPU stage process; they must be in its environment before torch is imported.

    On a machine whose cores are shared, OpenMP threads that spin-wait between parallel regions (the
    default) hold cores other processes need, and torch with one thread per core can run several times
    slower beside a single other busy process; passive waiting (``OMP_WAIT_POLICY=PASSIVE`` for GNU
    OpenMP, ``KMP_BLOCKTIME=0`` for Intel's) puts them to sleep instead. ``threads="available"`` sizes
    the pool from the cores this process may actually use (``available_cpus``), shared by ``processes``
    processes per node, instead of every core the machine has. bench/busy.py measures both.
    """
    env: dict[str, str] = {}
    if wait_policy == "passive":
        env.update(OMP_WAIT_POLICY="PASSIVE", KMP_BLOCKTIME="0")
    if threads == "available":
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // max(1, processes)))
    elif threads != "inherit":
        if int(threads) < 1:
            raise ConfigError(f"launch.cpu_threads={threads!r}: use a number of threads >= 1, 'available' or 'inherit'")
        env["OMP_NUM_THREADS"] = str(int(threads))
    return env


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, Slurm)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``);
    None when there is no quota."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.exists():
            quota = int(v1.read_text())
            return None if quota <= 0 else quota / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def has_cuda() -> bool:
    """Whether this machine has a CUDA device torch can use (imports torch; False if it is missing)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def describe(cmd: list[str]) -> str:
    """A copy-pasteable shell rendering of an argv list."""
    return " ".join(shlex.quote(str(part)) for part in cmd)


def config_file_for(cfg: RunConfig) -> Path:
    """Where the orchestrator writes the resolved config of a run."""
    return cfg.run_dir() / "config.resolved.json"


# ------------------------------------------------------------------------------------ one node of a job
def node_command(cfg: RunConfig, stage: str, config_file: str | os.PathLike, env: Mapping[str, str],
                 entry: str | None = None, python: str | None = None) -> list[str]:
    """What one node of a Slurm job runs for ``stage``: the configured launcher with the rendezvous of
    ``rendezvous(cfg, env)`` (the job's first host, a port from its id, this node's ``SLURM_NODEID``)."""
    return stage_command(cfg, stage, config_file, python=python, entry=entry, env=env, rdzv=rendezvous(cfg, env))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.launch STAGE --config FILE [--entry MODULE]``: what ``srun`` starts once per node of
    a stage's Slurm job. It builds the launcher command from the job's environment (``node_command``),
    prints it, and becomes it (exec), so that signals reach the launcher as if srun had started it."""
    import argparse
    import json

    from .config import config_from_dict, load_config

    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=main.__doc__)
    parser.add_argument("stage")
    parser.add_argument("--config", required=True, help="the run's resolved config (JSON) or a YAML config")
    parser.add_argument("--entry", default=None, help=f"the stage module (default: ${ENTRY_ENV} or stages)")
    args = parser.parse_args(argv)
    path = Path(args.config)
    cfg = config_from_dict(json.loads(path.read_text()), args.config) if path.suffix == ".json" else load_config(path)
    env = dict(os.environ)
    cmd = node_command(cfg, args.stage, args.config, env, entry=args.entry)
    print(f"[alignpipe] node {env.get('SLURM_NODEID', '0')} of {env.get('SLURM_JOB_NUM_NODES', '1')} "
          f"({env.get('SLURMD_NODENAME', 'this host')}): {describe(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
