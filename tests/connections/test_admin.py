"""The admin of the uid<->connection relation and the node liveness marks (connections/admin.py).

Guards the module's invariants: both pages list the rows and refuse every
write; a node shows alive exactly when the reaper would spare it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib import admin
from django.utils import timezone

from connections import services
from connections.models import Connection, Node, UserStatus
from connections.protocol import ClientType

CONNECTIONS = "/admin/connections/connection/"
NODES = "/admin/connections/node/"

pytestmark = pytest.mark.django_db


def login(uid: int, conn_id: str, node: str = "node-a", client_type: ClientType = ClientType.WEB) -> Connection:
    return services.connection_login(uid=uid, conn_id=conn_id, node=node, client_type=client_type)


def listed(response: Any) -> list[Any]:
    assert response.status_code == 200, response.status_code
    return list(response.context["cl"].result_list)


def test_connections_are_listed_searched_and_filtered(admin_client, new_uid):
    uid, other = new_uid(), new_uid()
    web = login(uid, f"node-a-{uid}-1")
    app = login(uid, f"node-b-{uid}-2", node="node-b", client_type=ClientType.APP)
    theirs = login(other, f"node-a-{other}-1")
    services.connection_logout(uid=other, conn_id=theirs.conn_id)

    page = admin_client.get(CONNECTIONS)
    content = page.content.decode()
    assert {web, app, theirs} <= set(listed(page))
    assert web.conn_id in content and "online" in content and "app" in content

    assert set(listed(admin_client.get(CONNECTIONS, {"q": str(uid)}))) == {web, app}
    assert listed(admin_client.get(CONNECTIONS, {"q": f"node-b-{uid}"})) == [app]
    assert listed(admin_client.get(CONNECTIONS, {"q": "no such connection"})) == []
    by_status = set(listed(admin_client.get(CONNECTIONS, {"user_status__exact": int(UserStatus.OFFLINE)})))
    assert theirs in by_status and web not in by_status
    by_client = set(listed(admin_client.get(CONNECTIONS, {"client_type__exact": int(ClientType.APP)})))
    assert app in by_client and web not in by_client
    assert set(listed(admin_client.get(CONNECTIONS, {"node": "node-b", "q": str(uid)}))) == {app}


def test_connection_pages_are_read_only(admin_client, new_uid):
    uid = new_uid()
    row = login(uid, f"node-a-{uid}-1")
    url = f"{CONNECTIONS}{row.pk}/change/"
    detail = admin_client.get(url)
    assert detail.status_code == 200 and row.conn_id in detail.content.decode()
    assert 'name="_save"' not in detail.content.decode()
    assert admin_client.get(f"{CONNECTIONS}add/").status_code == 403
    assert admin_client.post(f"{CONNECTIONS}add/", {"uid": uid, "conn_id": "forged"}).status_code == 403
    assert admin_client.post(url, {"uid": uid + 1, "user_status": 0}).status_code == 403
    assert admin_client.post(f"{CONNECTIONS}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    admin_client.post(CONNECTIONS, {"action": "delete_selected", "_selected_action": [row.pk], "index": 0})
    row.refresh_from_db()
    assert row.uid == uid and row.user_status == UserStatus.ONLINE
    assert "delete_selected" not in admin_client.get(CONNECTIONS).content.decode()


def test_nodes_are_listed_alive_exactly_when_the_reaper_spares_them(admin_client, settings, new_uid):
    settings.PUSH_NODE_DEAD_AFTER = 30
    fresh, stale = f"fresh-{new_uid()}", f"stale-{new_uid()}"
    services.node_heartbeat(node=fresh)
    services.node_heartbeat(node=stale)
    Node.objects.filter(node_id=stale).update(heartbeat_at=timezone.now() - timedelta(seconds=31))

    page = admin_client.get(NODES)
    nodes = {node.node_id: node for node in listed(page)}
    assert {fresh, stale} <= set(nodes)
    alive = admin.site._registry[Node].alive
    assert alive(nodes[fresh]) is True and alive(nodes[stale]) is False
    assert 'alt="True"' in page.content.decode() and 'alt="False"' in page.content.decode()

    services.node_reap_dead()
    assert set(Node.objects.filter(node_id__in=[fresh, stale]).values_list("node_id", flat=True)) == {fresh}


def test_node_pages_are_read_only(admin_client, new_uid):
    node = f"node-{new_uid()}"
    services.node_heartbeat(node=node)
    url = f"{NODES}{node}/change/"
    detail = admin_client.get(url)
    assert detail.status_code == 200 and node in detail.content.decode()
    assert 'name="_save"' not in detail.content.decode()
    assert admin_client.get(f"{NODES}add/").status_code == 403
    assert admin_client.post(url, {"hostname": "elsewhere"}).status_code == 403
    assert admin_client.post(f"{NODES}{node}/delete/", {"post": "yes"}).status_code == 403
    assert Node.objects.get(node_id=node).hostname != "elsewhere"


def test_anonymous_users_are_sent_to_the_admin_login(client, new_uid):
    uid = new_uid()
    row = login(uid, f"node-a-{uid}-1")
    services.node_heartbeat(node="node-a")
    for url in (
        CONNECTIONS,
        f"{CONNECTIONS}?q={uid}",
        f"{CONNECTIONS}{row.pk}/change/",
        NODES,
        f"{NODES}node-a/change/",
    ):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
