"""A real Chromium driven by Playwright's sync API, against pytest-django's live_server.

Playwright's own browser download is not used: the browser is Debian's `chromium` (or whatever
TANDEM_CHROMIUM points to). Without one the tests skip, unless CI requires them
(TANDEM_REQUIRE_BROWSER=1), where a missing browser is a failure.
"""
import os
import shutil

import pytest

from tests.conftest import required

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
]


def chromium_path() -> str | None:
    return os.environ.get("TANDEM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium():
    path = chromium_path()
    if not path:
        if required("browser"):
            pytest.fail("No Chromium found (set TANDEM_CHROMIUM or install Debian's chromium).")
        pytest.skip("No Chromium found (set TANDEM_CHROMIUM or `apt-get install chromium`).")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required("browser"):
            raise
        pytest.skip("playwright is not installed")
    # Playwright's sync API keeps an event loop in this thread, which Django's async-safety guard
    # mistakes for async code; the tests' ORM calls are plain synchronous code, so the guard is
    # lifted while the browser runs, and restored after.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(chromium, live_server):
    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, base_url=live_server.url)
    context.set_default_timeout(15000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def log_in(page, username: str, password: str) -> None:
    page.goto("/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/login/" not in url)
