"""API tokens for scripts: several named tokens per user, stored hashed, revocable.

The token itself is shown once when it is issued (admin or `manage.py token_create`); only its
sha256 is stored, so a database leak does not leak working tokens. Tokens are 256-bit random, so a
plain sha256 (not a slow password hash) is enough: there is nothing to brute-force offline.
"""
from django.conf import settings
from django.db import models
from django.db.models import Q


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What the token is for, e.g. 'trl-export on gpu-3'")
    key_prefix = models.CharField(max_length=16, help_text="The token's first characters, to tell tokens apart")
    key_hash = models.CharField(max_length=64, unique=True, help_text="sha256 of the token")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"
        constraints = [
            models.CheckConstraint(condition=Q(key_hash__regex=r"^[0-9a-f]{64}$"), name="apitoken_hash_hex"),
            models.UniqueConstraint(
                fields=["user", "name"], condition=Q(revoked_at__isnull=True), name="apitoken_active_name_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}...)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
