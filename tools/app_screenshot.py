"""Screenshots of app.py for a run, by headless Chromium: a test image classified with Grad-CAM, and the mistakes."""
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import quiet_warnings  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported

from fastcore.script import call_parse

CHROMIUM = '/usr/bin/chromium'  # Debian's package (apt-get install chromium), not a browser Playwright downloads
# Headless, and nothing of the browser's own phones home: no updates, sync, or background fetches.
CHROMIUM_ARGS = ['--no-sandbox', '--headless', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


@contextmanager
def local_page(executable=CHROMIUM, width=1300, height=1000):
    "A Playwright page in headless Chromium that may load only 127.0.0.1; yields (page, the other URLs it tried)."
    from playwright.sync_api import sync_playwright
    outside = []
    def only_local(route):
        url = route.request.url
        if url.startswith(('http://127.0.0.1', 'ws://127.0.0.1', 'data:', 'blob:')): route.continue_()
        else: outside.append(url); route.abort()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=dict(width=width, height=height))
            page.route('**/*', only_local)
            yield page, outside
        finally: browser.close()


@call_parse
def main(run: str = None,                 # run folder (default: the newest finished one under runs/)
         out: str = 'results/app',        # folder for classify.png and misclassified.png
         example: int = 3,                # which of the ten example test images to classify (1-10)
         layer: str = 'layer2',           # Grad-CAM layer to show
         n: int = 10):                    # how many misclassified test images
    "Start app.py for a run, classify one example test image, open the misclassified gallery, save both screenshots."
    from app import serving
    from run_folder import find_run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with serving(find_run(run), log=out / 'app.log') as server, local_page() as (page, outside):
        page.goto(server.url)
        page.wait_for_selector('#headline')
        page.locator('#layer label', has_text=layer).click()
        page.get_by_role('button', name=f'{example:02d}_').click()  # the example buttons are named by file
        page.wait_for_selector('#cams img', timeout=120_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / 'classify.png', full_page=True)
        page.get_by_role('tab', name='Misclassified test images').click()
        page.locator('#n input[type=number]').fill(str(n))
        page.locator('#n input[type=number]').press('Enter')
        page.click('#show-mistakes')
        page.wait_for_function('n => document.querySelectorAll("#mistakes img").length >= n', arg=n, timeout=300_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=out / 'misclassified.png', full_page=True)
    if outside: raise SystemExit(f'app_screenshot.py: the page tried to load from outside: {outside}')
    print(f'app_screenshot.py: wrote {out / "classify.png"} and {out / "misclassified.png"}')
