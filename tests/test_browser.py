"""The app in a real browser: Debian's chromium driven by Playwright (never `playwright install`).

Starts ``streamlit run app.py`` on a free localhost port over a tmp workspace, visits
every page through the sidebar, checks that the plotly charts and the deck.gl canvas
render, launches a tiny training job from the form and watches it finish. Fails on
any exception box, any console error and any request to a host other than
localhost / 127.0.0.1 (those are intercepted and aborted, so nothing leaves the machine).

Set ``BROWSER_SCREENSHOTS=DIR`` to keep a full-page screenshot of every page.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from waiting import wait_for

from core import REPO_ROOT
from core.jobs.manager import JobManager

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
PAGES = [  # sidebar label, title, plotly charts at least, deck.gl canvas
    ("Scenes", "Scenes", 0, True),
    ("Radio maps", "Radio maps", 2, False),
    ("Training", "Training", 2, False),
    ("Attention", "Attention", 3, False),
    ("Refinement inspector", "Refinement inspector", 4, False),
    ("Localize", "Localize", 0, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/install_system.sh)")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_app import build_workspace

    root = build_workspace(tmp_path_factory.mktemp("browser_ws"))
    port = _free_port()
    env = {**os.environ, "CORE_WORKSPACE": str(root), "CORE_JOBS_DB": str(root / ".jobs" / "jobs.sqlite")}
    log = open(root / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answered() -> bool:  # healthy, or dead (then there is nothing to wait for)
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None

    started = False
    with contextlib.suppress(AssertionError):  # a timeout: reported below with the log
        started = wait_for(answered, timeout=90, what="streamlit's health check") and proc.poll() is None
    if not started:
        log.close()
        pytest.fail("streamlit did not start:\n" + (root / "streamlit.log").read_text()[-3000:])
    yield url, root
    manager = JobManager(root / ".jobs" / "jobs.sqlite", cwd=root)
    for job in manager.active():
        manager.cancel(job.id, grace_s=1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.add_init_script(COUNT_SCRIPT_RUNS)

        def route(r):
            parsed = urlparse(r.request.url)
            if parsed.scheme in ("data", "blob") or parsed.hostname in LOCAL_HOSTS:
                r.continue_()
            else:
                problems.append(f"request to another host: {r.request.url}")
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        probes: list[str] = []  # Streamlit's own probes of <page>/_stcore/* on a deep link

        def on_response(r):
            if r.status >= 400:
                path = urlparse(r.url).path
                if re.fullmatch(r"/[\w-]+/_stcore/(host-config|health)", path):
                    probes.append(path)
                else:
                    problems.append(f"HTTP {r.status}: {r.url}")

        def on_console(m):
            if m.type != "error":
                return
            if probes and m.text.startswith("Failed to load resource: the server responded with a status of 404"):
                probes.pop()  # the console echo of one such probe
                return
            problems.append(f"console error: {m.text[:300]}")

        page.on("response", on_response)
        page.on("console", on_console)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.set_default_timeout(120_000)
        # the first visit of a fresh server is a deep link (a bookmark, a reconnecting tab):
        # it must still run inside app.py's frame (titled navigation, scene picker)
        page.goto(f"{url}/attention")
        page.get_by_role("heading", name="Attention", exact=True).wait_for()
        nav = page.get_by_test_id("stSidebarNav")
        nav.get_by_text("Refinement inspector", exact=True).wait_for()
        page.get_by_test_id("stSidebar").get_by_text("Active scene").wait_for()
        _settle(page, 0)
        yield page, problems
        context.close()
        browser.close()


# Streamlit marks its root with data-test-script-state (running, notRunning, ...): count the
# runs that finished, so a wait can ask for a run that finished after an action.
COUNT_SCRIPT_RUNS = """
window.__finishedRuns = 0;
new MutationObserver(records => {
  for (const r of records) {
    if (r.target.getAttribute('data-test-script-state') === 'notRunning' && r.oldValue !== 'notRunning') {
      window.__finishedRuns += 1;
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeOldValue: true,
                      attributeFilter: ['data-test-script-state']});
"""


def _runs(page) -> int:
    """Script runs finished so far on this page."""
    return page.evaluate("() => window.__finishedRuns")


def _settle(page, after: int | None) -> None:
    """Wait until a script run finished after ``after`` runs (None: the caller already saw the
    new run's output), nothing runs now, no spinner is left, and the browser has painted the result."""
    counted = "true" if after is None else f"window.__finishedRuns > {after}"
    page.wait_for_function(
        f"() => {counted}"
        " && document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state') === 'notRunning'"
        " && !document.querySelector('[data-testid=stStatusWidget] [data-testid=stStatusWidgetRunningIcon]')"
        " && document.querySelectorAll('[data-testid=stSpinner]').length === 0", timeout=120_000)
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def _no_exception_box(page, where: str) -> None:
    boxes = page.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"{where}: exception box: {boxes.first.inner_text()[:500]}"
    bugs = page.locator('[data-testid="stAlertContentError"]').filter(has_text="Unexpected error")
    assert bugs.count() == 0, f"{where}: {bugs.first.inner_text()[:500]}"


def _goto(page, label: str, title: str) -> None:
    # the page's own heading is written by its new script run, so that run has started; a
    # finished-run count is not needed (and a run that starts and ends within one observer
    # batch would not be counted). A click can go unanswered: after the training-job test the Localize
    # heading never came, twice in a row on 2026-12-03, then not in 5 runs; the cause was not found (a
    # click landing while the page re-renders is the guess). Then click again, as a user would.
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    heading = page.get_by_role("heading", name=title, exact=True)
    for attempt in range(3):
        page.get_by_test_id("stSidebarNav").get_by_text(label, exact=True).click()
        try:
            heading.wait_for(timeout=30_000 if attempt < 2 else 120_000)
            break
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    _settle(page, None)


def test_every_page_renders(browser_page):
    page, problems = browser_page
    shots = os.environ.get("BROWSER_SCREENSHOTS")
    for label, title, charts, deck in PAGES:
        _goto(page, label, title)
        plots = page.locator(".js-plotly-plot")
        page.wait_for_function(
            f"() => [...document.querySelectorAll('.js-plotly-plot')].filter(e => e.querySelector('.main-svg'))"
            f".length >= {charts}", timeout=120_000)
        assert plots.count() >= charts, f"{label}: {plots.count()} plotly charts, expected {charts}"
        if charts:  # drawn, not just a placeholder: the first chart has axes
            assert page.locator(".js-plotly-plot .xtick").count() > 0, f"{label}: plotly axes missing"
        if deck:
            canvas = page.locator('[data-testid="stDeckGlJsonChart"] canvas').first
            canvas.wait_for(state="visible")
            # a new canvas is 300x150 until deck.gl sizes it to its container
            page.wait_for_function("c => { const r = c.getBoundingClientRect(); return r.width > 300 && r.height > 300; }",
                                   arg=canvas.element_handle(), timeout=30_000)
            box = canvas.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 300, f"deck.gl canvas too small: {box}"
        _no_exception_box(page, label)
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / f"{label.lower().replace(' ', '_')}.png"), full_page=True)
    assert not problems, problems


def test_launch_a_tiny_training_job_and_see_it_finish(browser_page, server):
    page, problems = browser_page
    _, root = server
    _goto(page, "Training", "Training")
    form = page.get_by_test_id("stForm").first
    for label, value in (("Epochs", "1"), ("Use the first N samples (0 = all)", "120"), ("Batch size", "64")):
        box = form.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")
    name = form.get_by_role("textbox", name="Run name")
    name.fill("browser-run")
    name.press("Tab")
    form.get_by_test_id("stSelectbox").filter(has_text="Model size").click()
    page.get_by_role("option", name="tiny", exact=True).click()
    runs = _runs(page)
    form.get_by_role("button", name="Start training").click()
    _settle(page, runs)
    if os.environ.get("BROWSER_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["BROWSER_SCREENSHOTS"]) / "training_launched.png"), full_page=True)
    page.get_by_text("--out runs/browser-run").first.wait_for(timeout=60_000)  # the job panel lists it
    # the job panel polls every 2 s: wait for the status to turn final
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=stMarkdownContainer]')].some("
        "e => /#\\d+ train.*(succeeded|failed|cancelled)/.test(e.innerText))", timeout=300_000)
    manager = JobManager(root / ".jobs" / "jobs.sqlite", cwd=root)
    job = next(j for j in manager.list() if j.output and j.output.endswith("browser-run"))
    assert job.status == "succeeded", manager.log(job.id)
    assert "--set training.epochs=1" in job.command and "--set model.preset=tiny" in job.command
    assert page.get_by_text("succeeded").count() >= 1
    assert (root / "runs" / "browser-run" / "best.pt").exists()
    _no_exception_box(page, "Training after the job")
    assert not problems, problems


def test_localize_the_example_file_see_the_tracks_and_download(browser_page, server):
    """Upload the shipped example (docs/examples/reports_example.csv: 6 walks of the real etoile test split),
    localize it with a copy of the shipped run (it reads the shipped etoile map and dataset), see the tracks,
    download the positions."""
    import shutil

    page, problems = browser_page
    _, root = server
    shutil.copytree(REPO_ROOT / "assets" / "default_run", root / "runs" / "shipped-etoile")  # a run of the real etoile
    _goto(page, "Localize", "Localize")
    page.get_by_test_id("stRadio").get_by_text("Upload", exact=True).click()
    # the uploader is drawn by the run the click started (that run can be too quick to be counted: see _goto)
    page.get_by_test_id("stFileUploader").wait_for()
    _settle(page, None)
    runs = _runs(page)
    page.locator('[data-testid="stFileUploader"] input[type=file]').set_input_files(
        str(REPO_ROOT / "docs" / "examples" / "reports_example.csv"))
    _settle(page, runs)
    chosen = page.get_by_text("reports_example.shipped-etoile.map.csv")  # the caption names the output: run, method
    if chosen.count() == 0:  # the newest run of the scene may be preselected already
        runs = _runs(page)
        page.get_by_test_id("stSelectbox").filter(has_text="Run").click()
        page.get_by_role("option", name="runs/shipped-etoile", exact=True).click()
        _settle(page, runs)
    chosen.first.wait_for()
    runs = _runs(page)
    page.get_by_role("button", name="Localize", exact=True).click()
    _settle(page, runs)
    page.get_by_text("positions of 6 walks").first.wait_for(timeout=120_000)  # the tracks' title, drawn by plotly
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2
    if os.environ.get("BROWSER_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["BROWSER_SCREENSHOTS"]) / "localize_result.png"), full_page=True)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the positions").click()
    lines = Path(dl.value.path()).read_text().splitlines()
    assert lines[0].startswith("walk_id,time_s,method,x_m,y_m,sigma_major_m")
    assert len(lines) == 1 + 43  # a position per walk and report time: 43 in the example's 151 rows
    _no_exception_box(page, "Localize")
    assert not problems, problems
