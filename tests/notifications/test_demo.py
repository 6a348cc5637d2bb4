"""The demo views (notifications/demo.py): local profile only, CSRF, and pushes through the signed API.

The send view posts over HTTP to the server it runs in; here that server is
pytest-django's live server, reached through the Host header of the request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.staticfiles import finders
from django.test import Client

from notifications.sharding import model_for_uid
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

PAGE = "/demo/"
SEND = "/demo/push"


@pytest.fixture
def local(settings: Any) -> Any:
    settings.PUSH_ENV = "local"
    return settings


def host_of(live_server: Any) -> str:
    return live_server.url.removeprefix("http://")


@pytest.mark.parametrize("profile", ["test", "production"])
def test_demo_is_404_outside_the_local_profile(client, settings, profile):
    settings.PUSH_ENV = profile
    assert client.get(PAGE).status_code == 404
    assert client.post(SEND, {"uid": 1, "kind": "user", "title": "x"}).status_code == 404


def test_page_loads_the_client_module_and_sets_the_csrf_cookie(client, local):
    response = client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<script type="module" src="/static/pushsite/demo.js">' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert "csrftoken" in response.cookies


def test_client_is_one_static_module_that_imports_nothing():
    path = finders.find("pushsite/pushsite-client.js")
    assert path is not None
    source = Path(path).read_text(encoding="utf-8")
    assert "export class PushClient extends EventTarget" in source
    code = source.split("*/", 1)[1]  # past the module comment, which shows an import as usage
    assert not re.search(r"^\s*import\b|\bimport\(", code, re.MULTILINE), "the client depends on nothing"


def test_send_goes_through_the_signed_api_and_stores_the_message(local, live_server, new_uid):
    uid = new_uid()
    response = Client().post(
        SEND, {"uid": uid, "kind": "user", "title": "Hello", "text": "from the demo"}, HTTP_HOST=host_of(live_server)
    )
    assert response.status_code == 200, response.content
    answer = response.json()
    # The push API's own answer (PROTOCOL.md section 2), passed through.
    assert answer["code"] == 200 and answer["msg"] == "SUCCESS"
    assert answer["data"]["stored"] == 1 and answer["data"]["sent"] == 0
    noce_ack = answer["data"]["noce_acks"][str(uid)]
    row = model_for_uid(uid).objects.get(noce_ack=noce_ack)
    assert (row.to_uid, row.msg_type, row.from_uid) == (uid, 7, 0)
    assert row.body == {"title": "Hello", "text": "from the demo"}


def test_send_a_comment_carries_the_sender(local, live_server, new_uid):
    uid = new_uid()
    response = Client().post(
        SEND, {"uid": uid, "kind": "comment", "from_uid": 2001, "title": "Nice"}, HTTP_HOST=host_of(live_server)
    )
    assert response.status_code == 200, response.content
    (row,) = model_for_uid(uid).objects.filter(to_uid=uid)
    assert (row.msg_type, row.from_uid, row.body) == (5, 2001, {"title": "Nice"})


def test_send_reports_an_api_it_cannot_reach_as_502(local, new_uid):
    uid = new_uid()
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there: the view really calls over HTTP
    response = Client().post(SEND, {"uid": uid, "kind": "user", "title": "x"}, HTTP_HOST=nobody)
    assert response.status_code == 502
    assert "unreachable" in response.json()["msg"]
    assert not model_for_uid(uid).objects.filter(to_uid=uid).exists()


def test_send_needs_the_csrf_token(local, new_uid):
    browser = Client(enforce_csrf_checks=True)
    refused = browser.post(SEND, {"uid": new_uid(), "kind": "user", "title": "x"})
    assert refused.status_code == 403

    token = browser.get(PAGE).cookies["csrftoken"].value
    # With the token the request passes CSRF and reaches the form check.
    accepted = browser.post(SEND, {"csrfmiddlewaretoken": token, "uid": 0, "kind": "user", "title": "x"})
    assert accepted.status_code == 400
    assert accepted.json()["msg"].startswith("uid:")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"kind": "user", "title": "x"}, "uid"),
        ({"uid": 1, "kind": "system", "title": "x"}, "kind"),
        ({"uid": 1, "kind": "comment", "title": "x"}, "from_uid"),
        ({"uid": 1, "kind": "user", "title": ""}, "title"),
    ],
)
def test_send_refuses_a_bad_form_naming_the_field(client, local, data, field):
    response = client.post(SEND, data)
    assert response.status_code == 400
    assert response.json() == {"code": 400, "msg": response.json()["msg"]}
    assert response.json()["msg"].startswith(f"{field}:")


def test_send_is_post_only(client, local):
    assert client.get(SEND).status_code == 405
