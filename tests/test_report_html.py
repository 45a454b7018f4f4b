"""The report's layout (verdict and training signals first, full metrics last and collapsed) and its
self-contained HTML copy, rendered by headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import write_report
from pipeline.report_html import markdown_to_html
from tests import fake_stages

REPO = Path(__file__).resolve().parent.parent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmM"
                            "IQAAAABJRU5ErkJggg==")  # a 1x1 PNG


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A run whose SFT, RM and PPO stages ran (fake stages, 5 steps each; PPO wrote samples.jsonl)."""
    for knob in ("FAKE_STEPS", "FAKE_FAIL", "FAKE_CRASH", "FAKE_SLEEP"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("FAKE_STEPS", "5")
    config = tmp_path / "r.yaml"
    config.write_text(f"run_name: r\noutput_root: {tmp_path / 'out'}\nmodel: {{source: tiny}}\n"
                      "ppo:\n  data: {path: data/demo/prompts.jsonl}\n")
    cfg = load_config(config)
    for stage in ("sft", "rm", "ppo"):
        fake_stages.run_fake(cfg, stage)
    return cfg


def test_report_layout_answer_first_metrics_last(fake_run):
    text = write_report(fake_run, out=lambda line: None).read_text()
    order = ["## Verdict", "### Training signals", "## Stages", "## SFT", "## Reward model", "## PPO",
             "## Sample generations: SFT vs PPO", "## Full metrics"]
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions), positions
    signals = text.split("### Training signals")[1].split("## Stages")[0]
    # fake RM: eval_accuracy 0.75; fake PPO: score 0.1 * step, kl 0.01 * step over steps 1..5 (k = 1)
    assert "Reward model held-out accuracy: **0.750**" in signals and "mean margin (chosen − rejected) 0.400" in signals
    assert "PPO reward (score): 0.100 (first step, from step 1) -> **0.500** (last step, to step 5), change +0.400" \
        in signals
    assert "PPO KL to the reference: 0.010 (first step, from step 1) -> **0.050**" in signals
    # the final-metrics tables only at the end, each collapsed
    head, full = text.split("## Full metrics")
    assert "| metric | value |" not in head
    for title in ("SFT", "Reward model", "PPO"):
        assert f"<details>\n<summary>{title}: final metrics</summary>\n\n| metric | value |" in full
    assert full.count("<details>") == full.count("</details>") == 3
    assert "| eval_mean_margin | 0.4 |" in full


def test_html_report_is_self_contained(fake_run):
    write_report(fake_run, out=lambda line: None)
    html = (fake_run.run_dir() / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<title>alignpipe run report: r</title>" in html
    sources = re.findall(r"""<img[^>]*\bsrc="([^"]*)\"""", html)
    assert len(sources) >= 3 and all(src.startswith("data:image/png;base64,") for src in sources)
    for src in sources:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r"""(?:src|href)="(?:https?:|//|file:)""", html)  # nothing loaded from elsewhere
    verdict = html.split("Verdict: each policy against its parent")[1].split("<h2>")[0]
    assert "<table>" in verdict and "<td>reward model (rm stage)</td>" in verdict
    assert "<details>\n<summary>PPO: final metrics</summary>" in html
    assert "question 0 | with pipe" in html and "ppo answer 0<br>line two" in html


def test_html_escapes_foreign_markup_and_drops_outside_images(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "a.png").write_bytes(TINY_PNG)
    (tmp_path.parent / "outside.png").write_bytes(TINY_PNG)
    markdown = "\n".join([
        "# t", "", "![ok](report/a.png) ![gone](report/missing.png) ![far](../outside.png) "
        "![web](https://example.com/x.png)", "",
        "| a | b |", "|---|---|", "| <script>alert(1)</script> | x<br>y <img src=x onerror=alert(1)> |", "",
        "<div onclick=\"x()\">raw</div>", "", "<details>", "<summary>S</summary>", "", "inside", "", "</details>", ""])
    html = markdown_to_html(markdown, tmp_path)
    assert html.count("<img") == 1 and 'src="data:image/png;base64,' in html
    for alt in ("gone", "far", "web"):
        assert f"[image not available: {alt}]" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "x<br>y &lt;img src=x onerror=alert(1)&gt;" in html
    assert "<div" not in html and "&lt;div onclick=" in html
    assert "<details>\n<summary>S</summary>\n<p>inside</p>\n</details>" in html


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                ".ci/run installs it)")
def test_html_report_renders_in_headless_chromium(fake_run, tmp_path):
    write_report(fake_run, out=lambda line: None)
    page = (fake_run.run_dir() / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]
    subprocess.run(flags + [f"--screenshot={shot}", page], capture_output=True, timeout=180, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    assert _png_size(shot) == (1200, 900)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert shot.stat().st_size > 10_000 and pixels.std() > 0.05  # text, tables and plots, not a blank page
    dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    verdict = dom.split("Verdict: each policy against its parent")[1].split("<h2>")[0]
    assert "<table>" in verdict and "<td>reward model (rm stage)</td>" in verdict
