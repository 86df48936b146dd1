"""Roles: Django groups "annotator" and "researcher" (migration annotation 0003 creates them), and
is_staff for admin. An admin may do everything either role may.

- annotator: lease and judge their own assignments, read their own judgments;
- researcher: read every judgment, batch, checkpoint and snapshot, export;
- admin: everything, including pushing comparisons, registering checkpoints, freezing batches.
"""
from rest_framework.permissions import BasePermission

ANNOTATOR = "annotator"
RESEARCHER = "researcher"
# Not a role but a mark read with them: accounts of annotation.simulator, whose judgments are recorded
# with source "simulated" and kept out of human statistics.
SIMULATED = "simulated"
ROLES = (ANNOTATOR, RESEARCHER, SIMULATED)


def roles_of(user) -> frozenset[str]:
    """The user's role names, read once per request object (cached on the user instance)."""
    if not user or not user.is_authenticated or not user.is_active:
        return frozenset()
    cached = getattr(user, "_tandem_roles", None)
    if cached is None:
        cached = frozenset(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        if user.is_staff:
            cached |= {"admin"}
        user._tandem_roles = cached
    return cached


def remember_roles(user, names) -> None:
    """Set the user's roles from a query that already read them (token authentication does)."""
    user._tandem_roles = frozenset(n for n in names if n in ROLES) | ({"admin"} if user.is_staff else frozenset())


def is_admin(user) -> bool:
    return "admin" in roles_of(user)


def is_researcher(user) -> bool:
    roles = roles_of(user)
    return RESEARCHER in roles or "admin" in roles


def is_simulated(user) -> bool:
    return SIMULATED in roles_of(user)


def is_annotator(user) -> bool:
    roles = roles_of(user)
    return ANNOTATOR in roles or "admin" in roles


class IsAnnotator(BasePermission):
    message = "This needs the annotator role."

    def has_permission(self, request, view) -> bool:
        return is_annotator(request.user)


class IsResearcher(BasePermission):
    message = "This needs the researcher role."

    def has_permission(self, request, view) -> bool:
        return is_researcher(request.user)


class IsAdmin(BasePermission):
    message = "This needs an admin (staff) account."

    def has_permission(self, request, view) -> bool:
        return is_admin(request.user)


class IsAnnotatorOrResearcher(BasePermission):
    """Reads open to both; the view's queryset narrows an annotator to their own rows."""

    message = "This needs the annotator or researcher role."

    def has_permission(self, request, view) -> bool:
        return is_annotator(request.user) or is_researcher(request.user)
