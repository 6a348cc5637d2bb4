from django.urls import path, re_path

from . import demo, views

urlpatterns = [
    path("api/notice/userMessage", views.user_message, name="push-user-message"),
    path("api/comment/message", views.comment_message, name="push-comment-message"),
    path("api/notice/systemMessage", views.system_message, name="push-system-message"),
    path("api/push/config", views.push_config, name="push-config"),
    path("api/push/jobs/<str:job_id>", views.job_status, name="push-job-status"),
    re_path(r"^api/", views.api_not_found),
    path("healthz", views.healthz, name="healthz"),
    # The client demo: 404 outside the local profile (notifications/demo.py).
    path("demo/", demo.demo_page, name="push-demo"),
    path("demo/push", demo.demo_push, name="push-demo-push"),
]
