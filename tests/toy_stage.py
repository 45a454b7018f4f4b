"""A stage that lives outside the project, as a plugin would (tests/test_registry.py).

A run adds it with ``extra_stages: ["tests.toy_stage:SPEC"]``; nothing in pipeline/ or stages/ names it. It
writes a small artifact (``toy.message`` repeated ``toy.repeat`` times) and, with ``toy.copy_from``, copies
that parent stage's ``model/`` folder. It brings its own settings section, parents, memory estimate, report
section and console headline, like a built-in stage.
"""

from __future__ import annotations

import shutil
from typing import Any

from pydantic import Field

from pipeline.registry import StageSpec
from pipeline.sections import Section

ARTIFACT = "artifact.txt"


class ToyConfig(Section):
    """``toy``: the test folder's plugin stage (tests/toy_stage.py)."""

    message: str = Field("hello", description="The text the stage writes to its artifact.")
    repeat: int = Field(1, gt=0, description="How many lines of it.")
    copy_from: str | None = Field(None, description="A stage of the run whose model/ folder is copied (a parent).")


def parents(cfg: Any) -> list[str]:
    return [cfg.toy.copy_from] if cfg.toy.copy_from else []


def run(cfg: Any) -> dict[str, Any]:
    """The stage's body, in its own process. The shared set-up (StageRun, manifest, parents) comes from
    StageContext, imported here: this module is also read by the control plane, which never imports torch."""
    from stages.context import StageContext

    with StageContext(cfg, "toy", distributed=False) as ctx:
        toy = ctx.settings
        text = "".join(f"{toy.message}\n" for _ in range(toy.repeat))
        (ctx.dir / ARTIFACT).write_text(text)
        if toy.copy_from:
            shutil.copytree(ctx.run.parent_dir(toy.copy_from) / "model", ctx.dir / "model", dirs_exist_ok=True)
        metrics = {"lines": toy.repeat, "chars": len(text)}
        ctx.run.log(1, metrics)
        return ctx.finish(metrics)


def memory_estimate(cfg: Any, plan: Any) -> None:
    plan.frozen("toy_model")
    plan.note("toy: one frozen copy of the base model")


def report_section(section: Any) -> list[str]:
    text = (section.dir / ARTIFACT).read_text()
    return [f"The toy stage wrote {section.metrics['lines']} line(s): `{text.splitlines()[0]}`", ""] + \
        section.plot("toy_chars.png", "Toy characters", {"chars": "chars"}, "characters")


SPEC = StageSpec(name="toy", order=65, title="Toy", config_model=ToyConfig, run=run, parents=parents,
                 memory_estimate=memory_estimate, report_section=report_section, headline=("lines", "chars"))
