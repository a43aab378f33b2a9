"""The mesh in ComfyUI's web page, in a real browser against real ComfyUIs.

Two ComfyUI instances (scripts/comfyui_e2e.py starts them: CPU, their own base folders, the provider linked as
custom_nodes/comfy_mesh, a deliberately slow node) share a mesh. A runs the prompt through its HTTP API; then
B's page, in headless Chromium, loads the same prompt and queues it: the nodes B is served from the mesh carry
the comfy-mesh badge on the canvas (member, bytes, time, saved) and the Mesh sidebar tab lists both members.

Skipped, with the reason, without COMFYUI_DIR (a ComfyUI 0.21+ checkout; COMFYUI_PYTHON its Python, which must
import this checkout's `mesh`), without selenium, or without Debian's `chromium` and `chromium-driver`:

    COMFYUI_DIR=/tmp/comfy/ComfyUI COMFYUI_PYTHON=/tmp/comfy/venv/bin/python PYTHONPATH=$PWD:/tmp/comfy/stubs \
        .venv/bin/python -m pytest -q tests/test_comfyui_web.py

COMFY_MESH_SCREENSHOTS=DIR keeps the screenshots (webui-badge.png, webui-panel.png) there; by default they go to
pytest's tmp folder. The README's scripts/screenshots/webui-*.png were made with COMFY_MESH_SCREENSHOTS=scripts/screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
if not COMFYUI_DIR:
    pytest.skip("set COMFYUI_DIR to a ComfyUI 0.21+ checkout (see the module docstring)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (a dev dependency)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not CHROMIUM or not DRIVER:
    pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver", allow_module_level=True)

from scripts.comfyui_e2e import Instance, free_port, http, workflow  # noqa: E402
from tests.support.poll import poll  # noqa: E402

PAGE_TIMEOUT = 120.0
SLOW_NODE = "2"  # workflow(): 1 EmptyImage -> 2 MeshE2ESlowBlur -> 3 ImageInvert -> 4 PreviewImage


def drawn(browser: Any) -> None:
    """Return once the page has drawn two more frames (the canvas redraws on the next one): what a screenshot
    needs, asked of the browser instead of guessed with a sleep."""
    browser.set_script_timeout(10)
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; requestAnimationFrame(() => requestAnimationFrame(done));")


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = Path(os.environ.get("COMFY_MESH_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def comfyuis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Instance]]:
    comfy = Path(COMFYUI_DIR).resolve()
    python = os.environ.get("COMFYUI_PYTHON", "python3")
    work = tmp_path_factory.mktemp("comfyuis")
    mesh_port = free_port()
    common = {"MESH_SECRET": uuid.uuid4().hex, "MESH_MIN_FREE_RAM": "0", "MESH_CLUSTER": "web"}
    a = Instance("A", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{mesh_port}",
                                           "MESH_NODE_ID": "comfy-a"})
    b = None
    try:
        b = Instance("B", comfy, python, work, {**common, "MESH_LISTEN": f"127.0.0.1:{free_port()}",
                                               "MESH_NODE_ID": "comfy-b", "MESH_SEEDS": f"127.0.0.1:{mesh_port}"})
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        for inst in (a, b):
            if inst is not None:
                inst.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,720", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def set_setting(inst: Instance, name: str, value: object) -> None:
    """A ComfyUI user setting, stored by the server (what the settings dialog does)."""
    urllib.request.urlopen(urllib.request.Request(f"{inst.url}/settings/{name}", data=json.dumps(value).encode(),
                                                  method="POST"), timeout=10).close()


def b_settings(inst: Instance) -> dict[str, Any]:
    return http(inst.url + "/comfy-mesh/settings")


def open_page(driver: Any, inst: Instance) -> None:
    """B's page with the frontend and every extension loaded (ours sets window.comfyMesh)."""
    # A first visit opens the templates browser over the canvas; a user who has seen it does not get it.
    set_setting(inst, "Comfy.TutorialCompleted", True)
    driver.get(inst.url)
    poll(lambda: driver.execute_script(
        "return !!(window.comfyAPI?.app?.app?.graph && window.comfyMesh && window.LGraphBadge)"),
        "the frontend and the comfy-mesh extension loaded", PAGE_TIMEOUT)


def queue_on_page(driver: Any, prompt: dict[str, Any], shots: Path) -> None:
    """Load `prompt` into the page's canvas and queue it from there (so the page gets the prompt's events)."""
    loaded = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const app = window.comfyAPI.app.app;
        (async () => {
            // The page restores its last workflow while it starts: load ours until it holds (bounded).
            let outputs = [];
            for (let attempt = 0; attempt < 5 && outputs.length < 4; attempt++) {
                await app.loadApiJson(arguments[0], 'mesh-web-test');
                for (let i = 0; i < 20 && outputs.length < 4; i++) {
                    await new Promise(r => setTimeout(r, 100));
                    outputs = Object.keys((await app.graphToPrompt()).output);
                }
            }
            if (outputs.length === 4) await app.queuePrompt(0);
            done(outputs);
        })().catch(e => done(String(e)));
    """, prompt)
    if loaded != ["1", "2", "3", "4"]:
        driver.save_screenshot(str(shots / "failed-load.png"))
    assert loaded == ["1", "2", "3", "4"], loaded


def test_b_page_marks_the_nodes_served_from_the_mesh_and_lists_both_members(
        comfyuis: tuple[Instance, Instance], browser: Any, shots: Path) -> None:
    a, b = comfyuis
    seed = int(time.time()) % 100000
    before = a.provider_stats()
    a.run(workflow(seed))
    a.stores_settled(before)
    assert a.executions() == 1

    open_page(browser, b)
    queue_on_page(browser, workflow(seed), shots)
    served = poll(lambda: browser.execute_script(
        "const s = window.comfyMesh.served.get(arguments[0]); return s ? JSON.stringify(s) : null", SLOW_NODE),
        "a comfy-mesh.served event for the slow node on B's page", PAGE_TIMEOUT)
    served = json.loads(served)
    assert b.executions() == 0, "B executed the slow node: it was not served from the mesh"
    assert served["member"] == "comfy-a" and served["class_type"] == "MeshE2ESlowBlur"
    assert served["bytes"] > 512 * 512 * 3 * 4 * 0.9 and served["saved_seconds"] >= 3.0  # SLOW_SECONDS on A
    badge = browser.execute_script("""
        const node = window.comfyAPI.app.app.graph.getNodeById(Number(arguments[0]));
        const b = (node?.badges || []).find(b => b && b.comfyMesh);
        return b ? b.text : null;
    """, SLOW_NODE)
    assert badge and "comfy-a" in badge and "saved" in badge, badge
    # only the nodes the mesh served: the preview (an output node) is never served
    marked = browser.execute_script("return [...window.comfyMesh.served.keys()]")
    assert SLOW_NODE in marked and "4" not in marked

    # ComfyUI's settings dialog (its setting store) reaches the running provider
    for value in (False, True):
        browser.execute_script("window.comfyAPI.app.app.extensionManager.setting.set('ComfyMesh.Enabled', arguments[0])",
                               value)
        poll(lambda: b_settings(b)["enabled"] is value, f"the provider's policy enabled={value}", 15)

    browser.find_element("css selector", ".comfy-mesh-tab-button").click()
    rows = poll(lambda: browser.execute_script(
        "return [...document.querySelectorAll('#comfy-mesh-members tr[data-member]')]"
        ".map(r => [r.dataset.member, r.dataset.state])"), "the Mesh panel's members", 30)
    assert dict(rows) == {"comfy-a": "ALIVE", "comfy-b": "ALIVE"}
    text = browser.find_element("id", "comfy-mesh-panel").text
    assert "hit ratio" in text and "compute saved" in text and "memory:" in text
    drawn(browser)
    browser.save_screenshot(str(shots / "webui-panel.png"))
    browser.set_window_size(1800, 330)
    browser.find_element("css selector", ".comfy-mesh-tab-button").click()  # closed: the canvas alone
    browser.execute_script("""  // room for each badge over its node, for the screenshot
        const app = window.comfyAPI.app.app;
        [...app.graph.nodes].sort((x, y) => x.id - y.id).forEach((n, i) => { n.pos = [40 + i * 420, 150]; });
        app.canvas.ds.offset = [0, 0]; app.graph.setDirtyCanvas(true, true);
    """)
    drawn(browser)
    browser.save_screenshot(str(shots / "webui-badge.png"))


def test_with_nodes_2_0_the_mark_is_on_the_node_element(comfyuis: tuple[Instance, Instance], browser: Any,
                                                        shots: Path) -> None:
    """ComfyUI's "Modern Node Design" renders nodes as DOM elements (data-node-id): the badge goes there too."""
    a, b = comfyuis
    seed = int(time.time()) % 100000 + 100000
    before = a.provider_stats()
    a.run(workflow(seed))
    a.stores_settled(before)
    set_setting(b, "Comfy.VueNodes.Enabled", True)
    try:
        open_page(browser, b)
        assert browser.execute_script(
            "return window.comfyAPI.app.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
        queue_on_page(browser, workflow(seed), shots)
        text = poll(lambda: browser.execute_script(
            "return document.querySelector('[data-node-id=\"2\"] > .comfy-mesh-badge')?.textContent"),
            "the mesh badge on the slow node's element", PAGE_TIMEOUT)
        assert "comfy-a" in text and "saved" in text, text
        assert b.executions() == 0
    finally:
        set_setting(b, "Comfy.VueNodes.Enabled", False)
