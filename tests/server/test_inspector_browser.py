"""The web inspector in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright, on a live server with the real default model.

The test types a prompt, moves the controls and checks that the panels follow; it keeps
screenshots and the panels' update times under tests/results/inspector/ (and, with
PELLUCID_UPDATE_DOCS_IMG=1, refreshes the documentation's screenshots in docs/img/). Without Chromium or Playwright the tests are
skipped with a warning saying why (`make test` installs both where apt is usable).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from inspector_server import served
from paths import ROOT

pytestmark = [pytest.mark.real, pytest.mark.slow]

RESULTS = ROOT / "tests" / "results" / "inspector"
DOCS_IMG = ROOT / "docs" / "img"
WAIT_MS = 60_000  # generous: the CPU is shared


def _skip_loudly(reason: str):
    msg = f"BROWSER TESTS SKIPPED: {reason}"
    print(f"\n{msg}", file=sys.stderr)
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


def chromium_path() -> str | None:
    for p in (os.environ.get("PELLUCID_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if p and Path(p).exists():
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_loudly("the playwright package is missing (pip install -e '.[test]')")
    exe = chromium_path()
    if exe is None:
        _skip_loudly("no Chromium found (apt-get install chromium; `make test` does it where apt is usable)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def srv():
    """`pellucid serve` in-process: the default model in its default (served) format."""
    with served() as s:
        yield s


@pytest.fixture
def page(browser, srv):
    pg = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(srv.url + "/")
    yield pg
    pg.close()
    assert not errors, errors


def shot(locator, name: str, docs: bool = True) -> None:
    """A screenshot kept under tests/results/inspector/ (and, for the docs, in docs/img/)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    locator.screenshot(path=str(RESULTS / f"{name}.png"))
    if docs and os.environ.get("PELLUCID_UPDATE_DOCS_IMG") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copy(RESULTS / f"{name}.png", DOCS_IMG / f"{name}.png")


def updates(page, panel: str) -> int:
    return page.evaluate(f"window.inspector.updates[{panel!r}] || 0")


def wait_update(page, panel: str, before: int) -> None:
    page.wait_for_function(f"(window.inspector.updates[{panel!r}] || 0) > {before}", timeout=WAIT_MS)


def click_token(page, nth: int) -> None:
    """Click the nth token of the output and wait until the next-token panel shows that
    position (an update still under way for another position does not count)."""
    tok = page.locator("#output .tok").nth(nth)
    index = tok.get_attribute("data-index")
    tok.click()
    page.wait_for_function(
        f"(() => {{ const b = document.getElementById('panel-next'); return b.dataset.state === 'ready' && b.dataset.position === {index!r}; }})()",
        timeout=WAIT_MS)  # fmt: skip


def set_control(page, control: str, value) -> None:
    page.evaluate("([id, v]) => { const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('input')); }",
                  [control, str(value)])  # fmt: skip


def final_stage(page) -> list[dict]:
    """The last sampler stage's candidates: token id, probability, whether a bar is drawn."""
    return page.evaluate("""() => [...document.querySelectorAll('#stages .stage:last-child .cand')].map(g => ({
        id: Number(g.dataset.tokenId), prob: Number(g.dataset.prob), kept: g.dataset.kept === '1',
        bar: !!g.querySelector('rect.bar'), text: g.textContent}))""")


def stage(page, name: str) -> dict[int, dict]:
    cands = page.evaluate(f"""() => [...document.querySelectorAll('#stages [data-stage={name}] .cand')].map(g => ({{
        id: Number(g.dataset.tokenId), prob: Number(g.dataset.prob), kept: g.dataset.kept === '1'}}))""")
    return {c["id"]: c for c in cands}


def test_panels_follow_prompt_and_controls(page, srv):
    log: dict = {"updates": []}
    page.wait_for_function("document.getElementById('prompt-count').textContent.includes('tokens')", timeout=WAIT_MS)
    page.wait_for_selector("#panel-next[data-state=ready]", timeout=WAIT_MS)
    log["first_paint_ms"] = page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime")
    log["load_event_ms"] = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    count = int(page.text_content("#prompt-count").split()[0])
    ids = srv.state.llm.tokenizer.encode(srv.state.llm.render_chat([{"role": "user", "content": "What is the capital of France?"}]))
    assert count == len(ids)  # the rendered prompt is the engine's own
    assert page.locator("#rendered .tok").count() == len(ids)

    # type a prompt: the rendered prompt and the next-token panel follow
    before = updates(page, "next")
    page.fill("#prompt", "Name the largest planet of the solar system.")
    wait_update(page, "next", before)
    assert "planet" in page.text_content("#rendered")
    stages = page.eval_on_selector_all("#stages .stage", "els => els.map(e => e.dataset.stage)")
    assert stages == ["raw", "bias_penalties", "temperature", "top_k", "top_p", "min_p", "typical_p", "draw"]
    kept = page.text_content("#stages [data-stage=top_k] .setting")
    assert "40 tokens kept" in kept
    shot(page.locator("#inspect"), "inspector-next-token")

    # a style goes into the system prompt the engine sees
    before = updates(page, "next")
    page.select_option("#style-length", "concise")
    wait_update(page, "next", before)
    assert "Keep·your·answers·short" in page.text_content("#rendered").replace(" ", "")
    before = updates(page, "next")
    page.select_option("#style-length", "")
    wait_update(page, "next", before)

    # temperature 0: the final stage is the greedy one, one bar at 100%
    before = updates(page, "next")
    set_control(page, "temperature", 0)
    wait_update(page, "next", before)
    last = final_stage(page)
    bars = [c for c in last if c["bar"]]
    assert len(bars) == 1 and bars[0]["prob"] == 1.0 and "100%" in bars[0]["text"], last
    top = bars[0]["id"]
    raw = stage(page, "raw")
    assert max(raw.values(), key=lambda c: c["prob"])["id"] == top  # greedy = the raw argmax

    # ban that token (click its raw bar: logit bias -100): it is removed, another token wins
    before = updates(page, "next")
    page.click(f"#stages [data-stage=raw] .cand[data-token-id='{top}']")
    wait_update(page, "next", before)
    assert page.locator(f"#bias-list li[data-token-id='{top}']").count() == 1
    assert stage(page, "bias_penalties")[top]["kept"] is False
    bars = [c for c in final_stage(page) if c["bar"]]
    assert len(bars) == 1 and bars[0]["id"] != top
    shot(page.locator("#inspect"), "next-token-banned", docs=False)

    # generate through the API (streaming), then inspect a generated position
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-info').textContent.includes('tokens in')", timeout=WAIT_MS)
    n_gen = page.locator("#output .tok").count()
    assert n_gen > 0, page.text_content("#error")
    page.wait_for_function(f"document.querySelectorAll('#output .tok').length === {n_gen}")
    pick = min(2, n_gen - 1)
    click_token(page, pick)
    # temperature 0: the greedy token the inspector shows is the one the server generated there
    actual = [c for c in final_stage(page) if c["bar"]]
    assert len(actual) == 1 and "◀" in actual[0]["text"], final_stage(page)
    shot(page.locator("#playground"), "inspector-playground")

    # attention: the layer x head grid, one heatmap; choosing a head changes it
    before = updates(page, "attention")
    page.click(".tabs button[data-tab=attention]")
    wait_update(page, "attention", before)
    assert page.locator("#att-grid canvas").count() == 30 * 9
    info_avg = page.text_content("#att-info")
    assert "tokens" in info_avg
    before = updates(page, "attention")
    page.click("#att-grid canvas[data-layer='16'][data-head='0']")
    wait_update(page, "attention", before)
    assert page.locator("#att-grid canvas.sel[data-layer='16'][data-head='0']").count() == 1
    heat = page.locator("#att-heat")
    box = heat.bounding_box()
    heat.hover(position={"x": box["width"] - 8, "y": box["height"] - 8})  # the last row's last key
    assert page.locator("#att-tip").is_visible()
    w = float(page.get_attribute("#att-tip", "data-weight"))
    assert 0.0 <= w <= 1.0
    shot(page.locator("#inspect"), "inspector-attention")

    # logit lens: a row per stage; a target token changes the P(target) chart
    before = updates(page, "lens")
    page.click(".tabs button[data-tab=lens]")
    wait_update(page, "lens", before)
    assert page.locator("#lens-grid tr").count() == 1 + 31
    shot(page.locator("#inspect"), "inspector-lens")
    before = updates(page, "lens")
    page.fill("#lens-target", " Jupiter")
    page.dispatch_event("#lens-target", "change")
    wait_update(page, "lens", before)
    assert "Jupiter" in page.text_content("#lens-info") and "given" in page.text_content("#lens-info")
    shot(page.locator("#inspect"), "lens-target", docs=False)

    # budget: the reserve is max tokens
    before = updates(page, "budget")
    page.click(".tabs button[data-tab=budget]")
    wait_update(page, "budget", before)
    reserve = page.text_content("#budget-table tr[data-section='reserved for response'] td:nth-child(2)")
    before = updates(page, "budget")
    set_control(page, "max_tokens", 200)
    wait_update(page, "budget", before)
    assert page.text_content("#budget-table tr[data-section='reserved for response'] td:nth-child(2)") == "200" != reserve
    shot(page.locator("#inspect"), "inspector-budget")

    # model: the weights table and the parameter count of the loaded model
    before = updates(page, "model")
    page.click(".tabs button[data-tab=model]")
    wait_update(page, "model", before)
    assert "134,515,008" in page.text_content("#model-arch")
    shot(page.locator("#inspect"), "inspector-model")

    log["updates"] = page.evaluate("window.inspector.timings")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "timings.json").write_text(json.dumps(log, indent=1))
    print("\ninspector timings (ms):", json.dumps(log))


def test_raw_completion_and_bias_by_token_text(page):
    """Raw mode streams through /v1/completions (token ids from the logprobs' pieces); a bias
    typed as token text is resolved by the tokenizer."""
    page.wait_for_selector("#panel-next[data-state=ready]", timeout=WAIT_MS)
    page.check("input[name=mode][value=raw]")
    page.fill("#prompt", "The capital of Italy is")
    page.wait_for_function("document.getElementById('rendered').textContent.includes('Italy')", timeout=WAIT_MS)
    assert page.locator("#system-box").is_hidden()
    page.fill("#bias-token", " London")
    page.fill("#bias-value", "3")
    page.click("#bias-add")
    page.wait_for_selector("#bias-list li", timeout=WAIT_MS)
    assert "London" in page.text_content("#bias-list") and ": 3" in page.text_content("#bias-list")
    set_control(page, "temperature", 0)
    set_control(page, "max_tokens", 6)
    page.click("#generate")
    page.wait_for_function("document.getElementById('gen-info').textContent.includes('tokens in')", timeout=WAIT_MS)
    assert page.locator("#output .tok").count() > 0, page.text_content("#error")
    click_token(page, 0)
    greedy = [c for c in final_stage(page) if c["bar"]]
    assert len(greedy) == 1 and "◀" in greedy[0]["text"]  # the served token is the inspector's greedy one


def test_too_long_prompt_shows_the_servers_error(page):
    page.wait_for_selector("#panel-next[data-state=ready]", timeout=WAIT_MS)
    page.fill("#prompt", "word " * 400)
    page.wait_for_selector("#panel-next[data-state=error]", timeout=WAIT_MS)
    assert "the inspector looks at most 256" in page.text_content("#panel-next .panel-error")


def test_steering_panel_makes_a_vector_and_compares(page, srv):
    """The Steering tab: make a vector from examples typed into the page, then see the prompt
    continued without and with it; scale 0 makes the two sides the same."""
    page.wait_for_selector("#panel-next[data-state=ready]", timeout=WAIT_MS)
    page.fill("#prompt", "Tell me about your weekend.")
    page.click(".tabs button[data-tab=steer]")
    page.click("#steer-make summary")
    page.fill("#make-name", "joy")
    page.fill("#make-layers", "4-12")
    page.fill("#make-positive", "I love this, it is wonderful!\nWhat a joyful, fantastic day.\nThis is the best thing ever.")
    page.fill("#make-negative", "I hate this, it is awful.\nWhat a miserable, terrible day.\nThis is the worst thing ever.")
    before = updates(page, "steer")
    page.click("#make-go")
    page.wait_for_function("document.getElementById('make-info').textContent.includes('separate most')", timeout=WAIT_MS)
    assert Path(srv.steer_dir, "joy.gguf").is_file()
    page.wait_for_function("document.getElementById('steer-vector').value === 'joy'", timeout=WAIT_MS)
    set_control(page, "steer-layers", "6-10")
    page.dispatch_event("#steer-layers", "change")
    set_control(page, "steer-scale", "0.4")
    wait_update(page, "steer", before)
    page.wait_for_function("document.getElementById('panel-steer').dataset.state === 'ready'", timeout=WAIT_MS)
    plain, steered = page.text_content("#steer-plain-text"), page.text_content("#steer-steered-text")
    assert plain and steered and plain != steered
    assert page.locator("#steer-plain-top .hbar").count() == 8
    shot(page.locator("#panel-steer"), "inspector_steering")
    before = updates(page, "steer")
    set_control(page, "steer-scale", "0")
    wait_update(page, "steer", before)
    assert page.get_attribute("#panel-steer", "data-same") == "true"
    assert page.text_content("#steer-steered-text") == plain
