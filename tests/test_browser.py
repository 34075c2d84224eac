"""The notebooks in a real JupyterLab, driven by headless Chromium: every widget renders and responds.

nbval proves the kernel side of a notebook; this test proves the front end. It starts JupyterLab
from this environment on a loopback port with a temporary token (``smoke`` profile), opens each
notebook by URL in Debian's Chromium through Playwright, runs all cells, and checks that no cell
shows an error, that every widget view rendered (no "Error displaying widget", the expected
controls present), and that one interaction per inspector changes the picture it shows. A
screenshot of each notebook is saved under ``test-artifacts/browser/`` for a person to look at.

Marked ``browser``. Without a Chromium binary or Playwright it is skipped — unless
``MINILDM_REQUIRE_BROWSER=1`` (CI sets it), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 900

# Per notebook: the controls its widget must show, and one interaction that must change a picture.
# ("slider", description): focus that slider's handle and press the arrow keys;
# ("toggle", label): click that toggle button; ("buttons", [labels]): click each in turn (the
# first unlabelled one for ""); ("text", description, value): type into a text box and press Enter.
WIDGETS = {
    "00_shapes_world": {"controls": ["item", "seed"], "interaction": ("slider", "item")},
    "01_autoencoder": {"controls": ["item", "channel", "delta"], "interaction": ("slider", "item")},
    "02_text_and_image_encoders": {"controls": ["caption", "layer", "head"],
                                   "interaction": ("text", "caption", "a blue square")},
    "03_latent_diffusion": {"controls": ["prompt", "step", "layer", "token"], "interaction": ("slider", "step")},
    "05_paint_with_words": {"controls": ["prompt", "brush"], "interaction": ("buttons", ["", "sample"])},
    "06_adversarial_distillation": {"controls": ["prompt", "steps", "seed"], "interaction": ("toggle", "4")},
}

pytestmark = pytest.mark.browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_page():
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        missing = "a chromium binary" if chromium is None else "the playwright package"
        if os.environ.get("MINILDM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test needs {missing} (apt-get install -y chromium; pip install playwright)")
        pytest.skip(f"no {missing}: the browser test is skipped (CI runs it)")
    yield chromium, sync_playwright


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """A JupyterLab server on loopback over a copy of the notebooks (running them saves them)."""
    root = tmp_path_factory.mktemp("lab")
    for notebook in NOTEBOOKS:
        shutil.copy(notebook, root / notebook.name)
    settings = root / "_settings"
    # every cell in the DOM (no virtual scrolling), and no news toast over the page
    for plugin, values in (("@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"}),
                           ("@jupyterlab/apputils-extension/notification", {"fetchNews": "false",
                                                                             "checkForUpdates": False})):
        folder = settings / plugin.split("/")[0] / plugin.split("/")[1]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{plugin.split('/')[2]}.jupyterlab-settings").write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    # its own settings and workspaces: no tab of an earlier session is restored beside the notebook
    env = {**os.environ, "MINILDM_PROFILE": "smoke", "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "_workspaces")}
    log = open(root / "_server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
         "--allow-root"],  # CI machines run as root
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start: {(root / '_server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, token
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


def _shut_down_kernels(url: str, token: str) -> None:
    """End every kernel the server runs: a closed browser tab leaves its kernel alive, holding memory."""
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions", headers=headers), timeout=10) as r:
        sessions = json.load(r)
    for session in sessions:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions/{session['id']}", method="DELETE",
                                                      headers=headers), timeout=30).close()


def _code_cells(notebook: Path) -> int:
    return sum(c["cell_type"] == "code" for c in json.loads(notebook.read_text())["cells"])


PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show (not another tab's)


def _run_all(page, n_code: int) -> None:
    """Run > Run All Cells, then wait until every code cell has an execution count."""
    prompts = page.locator(f"{PANEL} .jp-CodeCell .jp-InputPrompt")
    for attempt in range(3):  # a click that lands before the kernel is wired up runs nothing: again
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        started = time.time()
        while time.time() < started + 30 and not any(re.search(r"\[(\*|\d+)\]", t) for t in prompts.all_inner_texts()):
            time.sleep(0.5)
        if any(re.search(r"\[(\*|\d+)\]", t) for t in prompts.all_inner_texts()):
            break
    deadline, stopped_since = time.time() + RUN_TIMEOUT_S, None
    while time.time() < deadline:
        texts = prompts.all_inner_texts()
        done = [t for t in texts if re.search(r"\[\d+\]", t)]
        if len(done) == n_code:
            return
        if _errors(page):
            return  # Run All stops at the first error; the caller reports it
        if any("*" in t for t in texts):
            stopped_since = None
        elif stopped_since is None:
            stopped_since = time.time()
        elif time.time() - stopped_since > 30:
            pytest.fail(f"execution stopped before the end, with no error shown: prompts {texts}")
        time.sleep(1)
    pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT_S} s: prompts {texts}")


def _errors(page) -> list[str]:
    outputs = page.locator(f"{PANEL} .jp-OutputArea-output").all_inner_texts()
    return [o[-1500:] for o in outputs if "Traceback (most recent call last)" in o or "Error displaying widget" in o]


def _widget_images(page) -> list[str]:
    return page.locator(f"{PANEL} .jupyter-widgets img").evaluate_all("imgs => imgs.map(i => i.src)")


def _labelled(page, description: str, kind: str):
    """The widget of ``kind`` (a CSS class) whose description label reads ``description``."""
    return page.locator(f"{PANEL} .jupyter-widgets.{kind}").filter(
        has=page.locator(".widget-label", has_text=re.compile(rf"^{re.escape(description)}$")))


def _interact(page, interaction) -> None:
    kind = interaction[0]
    if kind == "slider":
        handle = _labelled(page, interaction[1], "widget-slider").first.locator(".noUi-handle").first
        handle.focus()
        key = "ArrowLeft" if handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax") \
            else "ArrowRight"
        handle.press(key)
    elif kind == "toggle":
        page.locator(f"{PANEL} .widget-toggle-buttons button", has_text=re.compile(rf"^{interaction[1]}$")).first.click()
    elif kind == "text":
        box = _labelled(page, interaction[1], "widget-text").first.locator("input")
        box.fill(interaction[2])
        box.press("Enter")
    elif kind == "buttons":
        for label in interaction[1]:
            buttons = page.locator(f"{PANEL} .jupyter-widgets.widget-button")
            button = buttons.filter(has_text=re.compile(r"^\s*$")).first if label == "" else \
                buttons.filter(has_text=re.compile(rf"^\s*{label}\s*$")).first
            button.click()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebook_runs_and_its_widgets_render_and_respond(notebook, browser_page, jupyterlab):
    chromium, sync_playwright = browser_page
    url, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    spec = WIDGETS.get(notebook.stem)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/lab/workspaces/{notebook.stem}/tree/{notebook.name}?reset&token={token}")
            page.locator(f"{PANEL} .jp-CodeCell").first.wait_for(timeout=120_000, state="attached")
            # the kernel started and idle, as the status bar says ("Python 3 (ipykernel) | Idle")
            page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=120_000)
            _run_all(page, _code_cells(notebook))
            assert not _errors(page), f"{notebook.name}: a cell shows an error:\n" + "\n---\n".join(_errors(page))
            if spec is None:
                return
            page.locator(f"{PANEL} .jupyter-widgets").first.wait_for(timeout=60_000)
            labels = page.locator(f"{PANEL} .jupyter-widgets .widget-label").all_inner_texts()
            for control in spec["controls"]:
                assert control in labels, f"{notebook.name}: no {control!r} control among {labels}"
            page.wait_for_function("() => [...document.querySelectorAll('.jupyter-widgets img')]"
                                   ".some(i => i.src.startsWith('blob:') || i.src.startsWith('data:'))",
                                   timeout=60_000)
            before = _widget_images(page)
            _interact(page, spec["interaction"])
            deadline = time.time() + 120
            while _widget_images(page) == before:
                assert time.time() < deadline, f"{notebook.name}: {spec['interaction']} changed no picture"
                time.sleep(0.5)
            assert not _errors(page), f"{notebook.name}: the interaction raised:\n" + "\n---\n".join(_errors(page))
        finally:
            page.screenshot(path=str(ARTIFACTS / f"{notebook.stem}.png"), full_page=True)
            browser.close()
            _shut_down_kernels(url, token)
