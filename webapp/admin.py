"""API tokens in the admin: issue (the token is shown once, in a message), list, revoke."""
from django import forms
from django.contrib import admin, messages

from .auth import api_token_issue, api_token_revoke
from .models import ApiToken


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "name", "expires_at"]

    def clean(self):
        data = super().clean()
        # The model's "one active token per name" constraint mentions revoked_at, which the form
        # leaves out, so Django would not check it here.
        if ApiToken.objects.filter(user=data.get("user"), name=(data.get("name") or "").strip(),
                                   revoked_at__isnull=True).exists():
            raise forms.ValidationError("This user already has an active token with that name.")
        return data


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "key_prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "user__username", "key_prefix"]
    readonly_fields = ["user", "name", "key_prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    actions = ["revoke"]

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ApiTokenAddForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request, obj=None):
        return ["user", "name", "expires_at"] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return  # tokens are immutable; revoke and issue a new one instead
        # The form has validated the name (the model's unique constraint); this issues the token.
        row, token = api_token_issue(user=obj.user, name=obj.name, expires_at=obj.expires_at)
        obj.pk = row.pk
        obj.__dict__.update({f.attname: getattr(row, f.attname) for f in row._meta.concrete_fields})
        messages.warning(request, f"Token for {row.user}: {token} -- copy it now, it will not be shown again.")

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request, obj)

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            api_token_revoke(token=token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).")
