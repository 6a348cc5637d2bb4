"""The live demo page of the browser client, for the local profile only.

``/demo/`` serves a page that logs in with the development verifier, shows the
connection state, live notifications with an unread badge, acks on click and
the unread history (notifications/static/pushsite/demo.js drives it through
pushsite-client.js). ``/demo/push`` sends a push for the page: it signs the
request with PUSH_API_SECRET and posts it over HTTP to this server's own push
API, so a demo push takes exactly the path the main site's pushes take.

Invariants:
* outside ``PUSH_ENV=local`` both views answer 404, whatever DEBUG says;
* ``/demo/push`` is a CSRF-protected POST and stores nothing itself: every
  message it causes was accepted by the signed API.

Guarded by tests/notifications/test_demo.py and tests/e2e/test_demo_browser.py.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_POST

from .client import PushClient, PushError

KINDS = {"user": "personal notice (7)", "comment": "comment (5)"}


class DemoPushForm(forms.Form):
    """One push the demo page may send: a personal notice or a comment to one uid."""

    uid = forms.IntegerField(min_value=1, max_value=2**63 - 1)
    kind = forms.ChoiceField(choices=list(KINDS.items()))
    from_uid = forms.IntegerField(min_value=1, max_value=2**63 - 1, required=False)
    title = forms.CharField(max_length=200)
    text = forms.CharField(max_length=1000, required=False)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("kind") == "comment" and not cleaned.get("from_uid"):
            self.add_error("from_uid", "a comment needs the commenter's uid")
        return cleaned


def _local_only() -> None:
    if settings.PUSH_ENV != "local":
        raise Http404("the demo exists in the local profile only")


@require_GET
@ensure_csrf_cookie
def demo_page(request: HttpRequest) -> HttpResponse:
    """The demo page."""
    _local_only()
    return render(request, "notifications/demo.html", {"kinds": KINDS.items()})


@require_POST
def demo_push(request: HttpRequest) -> JsonResponse:
    """Send one push through this server's own signed API; answers what the API answered."""
    _local_only()
    form = DemoPushForm(request.POST)
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        return JsonResponse({"code": 400, "msg": f"{field}: {errors[0]}"}, status=400)
    push = form.cleaned_data
    body = {"title": push["title"], **({"text": push["text"]} if push["text"] else {})}
    # The request's own scheme and host reach this same server (the page was loaded from it).
    api = PushClient(f"{request.scheme}://{request.get_host()}", secret=settings.PUSH_API_SECRET)
    try:
        if push["kind"] == "comment":
            answer = api.comment([push["uid"]], body, from_uid=push["from_uid"])
        else:
            answer = api.user_message([push["uid"]], body)
    except PushError as error:
        status = error.status or 502  # 0: the API could not be reached at all
        return JsonResponse({"code": status, "msg": error.msg}, status=status)
    return JsonResponse(answer, status=answer.get("code", 200))
