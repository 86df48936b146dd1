"""Template helpers for the navigation: which sections the signed-in user may open."""
from django import template

from webapp.permissions import roles_of

register = template.Library()


@register.simple_tag(takes_context=True)
def tandem_nav(context) -> dict:
    """{"annotate": bool, "research": bool, "admin": bool} for the request's user (one query, cached)."""
    request = context.get("request")
    roles = roles_of(getattr(request, "user", None))
    return {"annotate": "annotator" in roles or "admin" in roles,
            "research": "researcher" in roles or "admin" in roles, "admin": "admin" in roles}
