"""The demo page and the browser client in a real browser, against real daphne processes.

The browser is Debian's Chromium, headless, driven through Debian's chromedriver
by selenium; nothing is downloaded. Each daphne runs in the local profile with
no PUSH_AUTH_VERIFY_URL, so the development verifier logs ``dev-<uid>`` in, and
shares the test run's database (MariaDB: the test databases; embedded: a
migrated SQLite file of its own, see tests/servers.py).

Proves, through the page a person would use:
* log in, receive a push sent through the signed API (the page's send form),
  ack it by clicking, the badge drops and the server holds it as read;
* the server restarts: the client reconnects on its schedule, logs in again
  and fetches the message that was pushed while it was away;
* a server that stays away: the client reports that it gave up, and starts
  over when the person asks.

Screenshots go to ``$PUSH_TEST_ARTIFACTS`` (default ``test-artifacts/``), one
folder per configuration. Without Chromium the module is skipped, except in
CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from django.conf import settings as django_settings
from websockets.sync.client import connect as ws_connect

from notifications.client import PushClient
from tests.servers import (
    BIN,
    ROOT,
    ServerProcess,
    configuration_environment,
    free_port,
    prepare_server_database,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
WAIT = 15.0  # seconds for anything the page should show


# --- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = "needs Debian's chromium and chromium-driver (scripts/setup.sh --dev installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.TemporaryDirectory(prefix="pushsite-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile.name}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    """Where screenshots go: a folder per configuration, so the two runs keep theirs."""
    configuration = "mariadb" if django_settings.DATABASES["default"]["ENGINE"].endswith("mysql") else "embedded"
    folder = Path(os.environ.get("PUSH_TEST_ARTIFACTS") or ROOT / "test-artifacts") / f"e2e-{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The demo page in the browser, read the way a person reads it."""

    def __init__(self, driver: Any, artifacts: Path, name: str) -> None:
        self.driver = driver
        self.artifacts = artifacts
        self.name = name

    def open(self, base_url: str, **query: str) -> None:
        self.driver.get(f"{base_url}/demo/" + (f"?{urlencode(query)}" if query else ""))

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Wait until condition() is truthy; on timeout, a screenshot and the page's event log."""
        from selenium.common.exceptions import TimeoutException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_driver: Any) -> Any:
            with contextlib.suppress(WebDriverException):
                return condition()
            return False

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(check)
        except TimeoutException:
            self.shot(f"failed-{self.name}")
            raise AssertionError(
                f"page did not show {what} within {timeout} s; state {self.text('#state')!r}, "
                f"badge {self.text('#badge')!r}, events:\n{self.text('#log')}"
            ) from None

    def wait_state(self, state: str, timeout: float = WAIT) -> None:
        self.wait(lambda: self.find("#state").get_attribute("data-state") == state, f"state {state}", timeout)

    def badge(self) -> int:
        return int(self.find("#badge").get_attribute("data-count"))

    def notices(self, css_list: str) -> dict[str, str]:
        """noce_ack -> class of each notification in a list (#live-list or #history-list)."""
        return {item.get_attribute("data-noce-ack"): item.get_attribute("class") for item in self.find_all(css_list)}

    def last_unread(self) -> list[str]:
        """noce_acks of the client's last unread reply ("unread" event), as the page kept it."""
        return self.driver.execute_script(
            "return (window.pushDemo.lastUnread?.items ?? []).map((item) => item.noce_ack)"
        )

    def log_in(self, uid: int) -> None:
        self.find("#ukey").clear()
        self.find("#ukey").send_keys(f"dev-{uid}")
        self.find("#login-btn").click()
        self.wait_state("logged-in")
        assert self.text("#who") == f"uid {uid}"

    def shot(self, label: str) -> Path:
        path = self.artifacts / f"{self.name}-{label}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def page(browser: Any, artifacts: Path, request: pytest.FixtureRequest) -> Page:
    return Page(browser, artifacts, request.node.name.removeprefix("test_"))


# --- the servers ---------------------------------------------------------------------------


class Server:
    """A daphne process serving the demo; restartable on the same port."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.env = env
        self.port = port or free_port()
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        node = f"demo-{uuid.uuid4().hex[:8]}"
        env = {**self.env, "PUSH_NODE_ID": node, "PUSH_REDIS_PREFIX": f"pushtest-{node}"}
        args = [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(self.port), "pushsite.asgi:application"]
        self.process = ServerProcess(node, args, env, self.port).start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@pytest.fixture(scope="module")
def server_env(django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Local profile, development verifier, the test run's database."""
    env = configuration_environment(tmp_path_factory.mktemp("demo-var"), push_env="local")
    env["PUSH_API_SECRET"] = django_settings.PUSH_API_SECRET
    prepare_server_database(env)
    return env


@pytest.fixture(scope="module")
def demo_server(server_env: dict[str, str]) -> Iterator[Server]:
    server = Server(server_env).start()
    yield server
    server.stop()


def unread_on_server(server: Server, uid: int) -> dict[str, int]:
    """The user's unread counts as the server answers them to a fresh login."""
    with ws_connect(f"ws://127.0.0.1:{server.port}/ws/push/", open_timeout=5) as ws:
        ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}, "seq": 1}))
        reply = json.loads(ws.recv(timeout=5))
    assert reply["msg_type"] == 1, reply
    return reply["body"]["unread"]


# --- tests -------------------------------------------------------------------------------------


def test_login_receive_a_push_and_ack_it(page, demo_server, new_uid):
    uid = new_uid()
    page.open(demo_server.url)
    page.wait_state("open")
    page.log_in(uid)
    assert page.badge() == 0
    page.shot("1-logged-in")

    # The send form posts to /demo/push, which signs and calls the push API.
    title = page.find("#send-title")
    title.clear()
    title.send_keys("Your order 5531 shipped")
    page.find("#send-btn").click()
    page.wait(lambda: page.text("#send-result").startswith("stored 1, sent live to 1"), "the API's answer")
    noce_ack = page.text("#send-result").rsplit(" ", 1)[-1]

    page.wait(lambda: noce_ack in page.notices("#live-list .notice"), "the push in the live list")
    item = page.find(f'#live-list .notice[data-noce-ack="{noce_ack}"]')
    assert "Your order 5531 shipped" in item.text
    assert "unread" in item.get_attribute("class")
    assert page.badge() == 1
    assert noce_ack in page.notices("#history-list .notice")
    page.shot("2-push-arrived")

    item.click()
    page.wait(lambda: page.badge() == 0, "the badge at 0 after the ack")
    assert "read" in item.get_attribute("class").split()
    page.wait(lambda: ": 1 marked read" in page.text("#log"), "the server's ack reply")
    assert page.notices("#history-list .notice") == {}
    page.shot("3-acked")
    assert unread_on_server(demo_server, uid) == {}, "the server holds the message as read"


def test_server_restart_reconnects_and_fetches_what_was_missed(page, server_env, demo_server, new_uid):
    uid = new_uid()
    node = Server(server_env).start()
    try:
        # Short reconnect delays from the page's query string (milliseconds after the loss).
        page.open(node.url, reconnect="1500,4000,10000")
        page.log_in(uid)
        assert page.badge() == 0

        node.stop()
        page.wait_state("reconnecting")
        page.shot("1-reconnecting")

        # Pushed while the page has no socket: through another node's API, into the shared database.
        api = PushClient(demo_server.url, secret=django_settings.PUSH_API_SECRET)
        answer = api.user_message([uid], {"title": "Sent while you were away"})
        assert answer["data"]["sent"] == 0, "nobody was online to get it live"
        missed = answer["data"]["noce_acks"][str(uid)]

        node.start()  # the same port: the page's client finds it on its own
        page.wait_state("logged-in", timeout=30)
        # The page's last unread reply had nothing before the restart: this one came after the re-login.
        page.wait(lambda: missed in page.last_unread(), "the missed message in the unread list")
        assert missed in page.notices("#history-list .notice")
        assert page.badge() == 1
        assert "Sent while you were away" in page.text("#history-list")
        events = page.text("#log")
        assert "reconnecting (attempt 1 of 3" in events
        page.shot("2-reconnected")
    finally:
        node.stop()


def test_server_that_stays_away_makes_the_client_give_up(page, server_env, new_uid):
    uid = new_uid()
    node = Server(server_env).start()
    try:
        page.open(node.url, reconnect="200,400,600")
        page.log_in(uid)
        node.stop()
        page.wait_state("gave-up")
        events = page.text("#log")
        for attempt in (1, 2, 3):
            assert f"reconnecting (attempt {attempt} of 3" in events
        assert page.find("#reconnect-btn").is_displayed()
        page.shot("1-gave-up")

        node.start()
        page.find("#reconnect-btn").click()
        page.wait_state("logged-in")
        assert not page.find("#reconnect-btn").is_displayed()
    finally:
        node.stop()
