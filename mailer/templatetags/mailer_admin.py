"""Admin template helpers: the index and sidebar grouped for the people who use them."""

from __future__ import annotations

from django import template

register = template.Library()

#: mailer's models by what a marketer does with them; anything not named here (a model
#: added later) lands in the last group, never out of sight.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Campaigns", ("campaign", "dripseries", "enrollment")),
    ("Audience", ("contact", "segment", "tag", "suppression")),
    ("Content", ("template",)),
    ("Outbox", ("message", "event", "link")),
)
OPERATIONS = "Sending operations"
#: django-celery-beat's schedule rows: plumbing that mailer's migrations write.
PLUMBING = ("django_celery_beat",)


@register.simple_tag
def mailer_grouped_apps(app_list: list[dict]) -> list[dict]:
    """The admin's app list with mailer split into marketer-sized groups (campaigns,
    audience, content, outbox, then the sending operations), shown first, and the
    periodic-task plumbing last. Other apps are left as Django lists them."""
    mailer = [app for app in app_list if app.get("app_label") == "mailer"]
    plumbing = [app for app in app_list if app.get("app_label") in PLUMBING]
    others = [app for app in app_list if app not in mailer and app not in plumbing]
    groups, last = [], []
    for app in mailer:
        models = {m.get("object_name", "").lower(): m for m in app.get("models", [])}
        for name, wanted in GROUPS:
            chosen = [models.pop(key) for key in wanted if key in models]
            if chosen:
                groups.append({**app, "name": name, "models": chosen, "group": "mailer"})
        if models:
            rest = list(models.values())
            groups.append({**app, "name": OPERATIONS, "models": rest, "group": "mailer"})
    for app in plumbing:
        last.append({**app, "name": f"{app['name']} (scheduling plumbing)", "group": "plumbing"})
    return groups + others + last
