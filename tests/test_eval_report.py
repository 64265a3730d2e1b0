"""`llama2 eval report`: tables and charts of a run, and the HTML report opened in headless chromium."""

import json
import shutil

import pytest

from llama2.eval.report import comparison_rows, summary_rows, write_report
from llama2.eval.runs import ModelRun, Run, read_run, write_run
from llama2.eval.suite import ItemResult, TaskResult

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def multiple_choice(outcomes):
    items = [
        ItemResult(f"q{k}", bool(o), f"question {k}", "answer", "right", {"correct_norm": bool(o)})
        for k, o in enumerate(outcomes)
    ]
    return TaskResult("facts", "multiple_choice", "facts", items, 1.0, chance=0.25)


def redteam(outcomes, answer):
    items = []
    for k, o in enumerate(outcomes):
        dialog = [{"role": "user", "content": f"request {k} {HOSTILE}"}]
        details = {
            "category": ["privacy", "self_harm"][k % 2],
            "style": "direct",
            "dialog": dialog,
            "refused": not o,
            "unsafe": bool(o),
            "reason": "rules",
            "score": None,
        }
        items.append(ItemResult(f"r{k}", bool(o), dialog[-1]["content"], answer, "", details))
    return TaskResult("redteam", "redteam", "red team", items, 1.0)


@pytest.fixture
def run():
    tasks = [multiple_choice([1, 1, 1, 0]), redteam([1, 1, 0, 1], HOSTILE)]
    base = ModelRun("base.gguf", tasks, 2.0, {"batch_size": 1})
    other = ModelRun("q8 <b>.gguf", [multiple_choice([1, 0, 1, 1]), redteam([0, 1, 0, 0], "I can't.")], 3.0)
    return Run("demo", [base, other])


def test_tables_and_round_trip(run, tmp_path):
    rows = summary_rows(run)
    assert rows[0] == ["task", "metric", "n", "chance", "base.gguf", "q8 <b>.gguf"]
    assert rows[1][:4] == ["facts", "accuracy", "4", "25.0%"]
    assert rows[1][4] == "75.0 +/- 25.0%"  # 3 of 4; sample sd 0.5 / sqrt(4)
    assert rows[3][1:2] == ["violation_rate"] and rows[3][4].startswith("75.0")
    comparisons = comparison_rows(run)
    assert [r[0] for r in comparisons[1:]] == ["facts", "redteam"]
    assert comparisons[1][5:8] == ["50.0%", "1", "1"]  # q1 flips 1 -> 0, q3 flips 0 -> 1
    assert comparisons[2][4].startswith("-50.0 [")
    write_run(run, tmp_path)
    again = read_run(tmp_path)
    assert summary_rows(again) == rows and json.loads((tmp_path / "results.json").read_text())["suite"] == "demo"


def test_html_report_in_headless_chromium(run, tmp_path):
    """The report opens, shows its tables and every chart, and shows model text as text (nothing runs)."""
    paths = write_report(run, tmp_path)
    html = paths["html"].read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;" in html
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.goto(paths["html"].as_uri())
            assert page.title() == "llama2 eval: demo"
            assert page.locator("#summary tr").count() == 1 + 3
            assert page.locator("#comparisons tr").count() == 1 + 2
            widths = page.eval_on_selector_all("img.chart", "images => images.map(i => i.complete && i.naturalWidth)")
            assert len(widths) == 4 and all(w > 100 for w in widths)
            assert page.evaluate("window.pwned") is None
            assert page.locator(".answer", has_text="window.pwned").first.text_content() == HOSTILE
            assert "q8 <b>.gguf" in page.locator("#models").text_content()
        finally:
            browser.close()
