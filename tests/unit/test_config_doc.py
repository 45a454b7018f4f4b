"""docs/CONFIG.md is generated from the config models (pipeline/config_doc.py) and every key is described."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_field_of_every_config_section_has_a_description():
    from pipeline.config import run_config_model
    from pipeline.config_doc import missing_descriptions

    assert missing_descriptions(run_config_model()) == []


def test_missing_descriptions_finds_an_undescribed_nested_field():
    """The check itself: a field without a description, two sections down and inside a list, is named."""
    from pydantic import BaseModel, Field

    from pipeline.config_doc import missing_descriptions

    class Leaf(BaseModel):
        described: int = Field(0, description="yes")
        bare: int = 0

    class Middle(BaseModel):
        leaves: list[Leaf] = Field(default_factory=list, description="a list of leaves")

    class Root(BaseModel):
        middle: Middle = Field(default_factory=Middle, description="a section")
        top: str = "x"

    assert missing_descriptions(Root) == ["top", "middle.leaves[].bare"]


def test_config_reference_page_is_up_to_date():
    from pipeline.config_doc import render

    page = (REPO / "docs" / "CONFIG.md").read_text()
    assert page == render(), "docs/CONFIG.md is stale: run `make config-doc` (python -m pipeline.config_doc)"


def test_the_page_lists_each_stage_section_with_the_module_that_declares_it():
    from pipeline.config_doc import render

    page = render()
    assert "## `ppo.train`" in page and "Declared in `stages/ppo/config.py` (`PPOTrainConfig`)." in page
    assert "Declared in `stages/sft_config.py` (`SFTConfig`)." in page
    assert "| `kl_coef` | `float` | `0.05` |" in page
