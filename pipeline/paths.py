"""Where the relative paths of a run config point, and the files alignpipe ships.

Inputs a config names (data files, chat templates, DeepSpeed JSONs, constitutions, model folders) are
looked up, when relative, in this order; the first that exists wins:

1. the folder of the config file;
2. the working directory the run started in (where ``outputs/`` of earlier runs are);
3. alignpipe's own files (``PACKAGE_ROOT``: the folder holding the ``pipeline``, ``stages``, ``data`` and
   ``configs`` packages; the repository root in a checkout, ``site-packages`` when installed), so that
   ``data/demo/sft.jsonl`` or ``configs/deepspeed/zero2.json`` in a shipped config read the shipped files
   whether alignpipe runs from a checkout or an installed wheel.

When none exists, the first candidate is what error messages name. Outputs (``output_root``,
``model.cache_dir``) are relative to the working directory.

The two folders come from the config being loaded: ``load_config`` records them in the config's
``paths`` section, which the resolved config carries to every stage process (a stage process runs in
``PACKAGE_ROOT``, not in the user's folder), and makes them the ones this process resolves with
(``use_bases``). Paths are recorded as written, so stage hashes never depend on where a file was found:
the content of each data file is what a stage's input hash covers.

Shipped configs are found by name as well as by path (``alignpipe run tiny``): ``find_config``.
Standard library only.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = PACKAGE_ROOT / "configs"


@dataclass(frozen=True)
class Bases:
    """``config_dir``: the config file's folder (None: no file, e.g. a config built in code); ``work_dir``:
    where outputs go (None: the current working directory)."""

    config_dir: Path | None = None
    work_dir: Path | None = None

    def work(self) -> Path:
        return self.work_dir or Path.cwd()


_bases = Bases()


def use_bases(config_dir: str | os.PathLike | None, work_dir: str | os.PathLike | None) -> None:
    """Resolve relative paths in this process against these folders (``load_config`` calls this)."""
    global _bases
    _bases = Bases(Path(config_dir) if config_dir else None, Path(work_dir) if work_dir else None)


def current_bases() -> Bases:
    return _bases


def _expand(value: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(value)))


def input_candidates(value: str | os.PathLike) -> list[Path]:
    """Where a relative input path is looked for, in order (an absolute path: itself)."""
    path = _expand(value)
    if path.is_absolute():
        return [path]
    bases = [_bases.config_dir, _bases.work(), PACKAGE_ROOT]
    unique = list(dict.fromkeys(b.resolve() for b in bases if b is not None))
    return [base / path for base in unique]


def resolve_path(value: str | os.PathLike) -> Path:
    """An input path of a config -> the first of ``input_candidates`` that exists (else the first)."""
    candidates = input_candidates(value)
    return next((c for c in candidates if c.exists()), candidates[0])


def output_path(value: str | os.PathLike) -> Path:
    """An output path of a config (``output_root``, ``model.cache_dir``): relative to the working directory."""
    path = _expand(value)
    return path if path.is_absolute() else _bases.work().resolve() / path


# --------------------------------------------------------------------------------------- shipped
def demo_data_dir() -> Path:
    """``data/demo`` as shipped (the demo data sets; the tiny model's tokenizer is trained on them)."""
    return Path(str(resources.files("data").joinpath("demo")))


def eval_tasks_dir() -> Path:
    """``pipeline/eval_tasks`` as shipped (lm-evaluation-harness task files)."""
    return Path(str(resources.files("pipeline").joinpath("eval_tasks")))


def shipped_configs() -> dict[str, Path]:
    """Name -> file of the run configs alignpipe ships: ``configs/<name>.yaml`` and
    ``configs/examples/<name>.yaml``."""
    found: dict[str, Path] = {}
    for folder in (SHIPPED_CONFIGS / "examples", SHIPPED_CONFIGS):  # a top-level name wins
        found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return dict(sorted(found.items()))


def find_config(value: str | os.PathLike) -> Path | None:
    """The config file the command line names: a path (relative to the working directory, else to
    ``PACKAGE_ROOT``, as ``configs/tiny.yaml`` is) or a shipped config's name (``tiny``). None: no such file."""
    path = _expand(value)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PACKAGE_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return shipped_configs().get(str(value))


def config_not_found(value: str | os.PathLike) -> str:
    """The message for a config that ``find_config`` did not find: where it looked, the shipped names and
    the closest one."""
    names = list(shipped_configs())
    text = str(value)
    stem = Path(text).stem if text.endswith((".yaml", ".yml")) else text
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"config file not found: {text}{hint} (give a YAML file, or the name of a shipped config: "
            f"{', '.join(names) or 'none'})")
