"""mailer's HTTP API (Django REST framework): sending, reading and suppressing over HTTP.

Mount it with ``path("api/v1/", include("mailer.http_api.urls"))``; health checks and
metrics with ``path("", include("mailer.http_api.ops_urls"))``.
"""
