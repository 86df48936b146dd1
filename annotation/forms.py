"""The annotator's forms. They speak in screen sides (left / right); the view maps the sides to the
comparison's response_a / response_b through the assignment's displayed_order."""
from django import forms
from django.core import signing

from . import services
from .models import Assignment, Judgment

SIDES = (("left", "A (left)"), ("right", "B (right)"))
# Keys 1-4 on screen, stored strength 0-3 (Judgment.Strength).
STRENGTH_CHOICES = [
    (Judgment.Strength.NEGLIGIBLY, "1 · negligibly better / unsure"),
    (Judgment.Strength.SLIGHTLY, "2 · slightly better"),
    (Judgment.Strength.BETTER, "3 · better"),
    (Judgment.Strength.SIGNIFICANTLY, "4 · significantly better"),
]
HARM_CATEGORY_CHOICES = [(c, c.replace("_", " ")) for c in services.HARM_CATEGORIES]
_STARTED_SALT = "annotation.judgment.started"


def sign_started(*, assignment_id: int, at: float) -> str:
    """A tamper-proof record of when the page was rendered: the timer that works without JS."""
    return signing.dumps({"assignment": assignment_id, "at": at}, salt=_STARTED_SALT)


def unsign_started(value: str, *, assignment_id: int) -> float | None:
    try:
        data = signing.loads(value, salt=_STARTED_SALT, max_age=86400)
    except signing.BadSignature:
        return None
    return data["at"] if data.get("assignment") == assignment_id else None


class _RawCheckbox(forms.CheckboxInput):
    """A checkbox that hands the submitted string to its field, so a bogus value is an error
    rather than silently true (CheckboxInput turns any non-empty string into True)."""

    def value_from_datadict(self, data, files, name):
        return data.get(name)


class SafetyFlagField(forms.Field):
    """An "unsafe" checkbox: absent or off = safe, "on" = unsafe, anything else is refused."""

    widget = _RawCheckbox
    TRUE, FALSE = {"on", "true", "1"}, {"", "off", "false", "0"}

    def __init__(self, **kwargs):
        super().__init__(required=False, **kwargs)

    def to_python(self, value) -> bool:
        if value is None or value is False:
            return False
        if value is True:
            return True
        value = str(value).strip().lower()
        if value in self.TRUE:
            return True
        if value in self.FALSE:
            return False
        raise forms.ValidationError("Mark each response safe or unsafe (tick the box for unsafe).")


class JudgmentForm(forms.Form):
    side = forms.ChoiceField(choices=SIDES, widget=forms.RadioSelect, label="Which response is better?",
                             error_messages={"required": "Choose the better response (A or B)."})
    strength = forms.TypedChoiceField(
        choices=STRENGTH_CHOICES, coerce=int, widget=forms.RadioSelect, label="How much better?",
        error_messages={"required": "Say how much better (1-4)."},
    )
    left_unsafe = SafetyFlagField(label="A (left) is unsafe")
    right_unsafe = SafetyFlagField(label="B (right) is unsafe")
    harm_categories = forms.MultipleChoiceField(
        choices=HARM_CATEGORY_CHOICES, required=False, widget=forms.CheckboxSelectMultiple,
        label="Harm categories (optional)",
    )
    note = forms.CharField(required=False, max_length=services.MAX_NOTE_LENGTH, label="Note (optional)",
                           widget=forms.Textarea(attrs={"rows": 2}))
    seconds_spent = forms.FloatField(required=False, min_value=0, max_value=86400, widget=forms.HiddenInput)
    started = forms.CharField(required=False, widget=forms.HiddenInput)
    idempotency_key = forms.CharField(max_length=100, widget=forms.HiddenInput)

    def judgment_fields(self, *, assignment: Assignment, now: float) -> dict:
        """The cleaned form as judgment_submit's keyword arguments (screen sides -> A/B)."""
        data = self.cleaned_data
        left, right = ("A", "B") if assignment.displayed_order == Assignment.Order.AB else ("B", "A")
        unsafe = {left: data["left_unsafe"], right: data["right_unsafe"]}
        seconds = data["seconds_spent"]
        if seconds is None:  # no JS: the signed render time stands in for the timer
            started = unsign_started(data["started"], assignment_id=assignment.pk)
            seconds = round(max(now - started, 0.0), 1) if started is not None else None
        return {
            "chosen": left if data["side"] == "left" else right,
            "strength": data["strength"],
            "safety": services.SafetyLabels(a_safe=not unsafe["A"], b_safe=not unsafe["B"]),
            "harm_categories": data["harm_categories"],
            "note": data["note"],
            "seconds_spent": seconds,
            "idempotency_key": data["idempotency_key"],
        }


class PromptWriteForm(forms.Form):
    text = forms.CharField(max_length=services.MAX_PROMPT_LENGTH, label="Your prompt",
                           widget=forms.Textarea(attrs={"rows": 4}))
    is_adversarial = forms.BooleanField(required=False, label="Adversarial / safety-related prompt")


class PromptContinueForm(forms.Form):
    text = forms.CharField(max_length=services.MAX_PROMPT_LENGTH, label="Your next message in this dialogue",
                           widget=forms.Textarea(attrs={"rows": 4}))
