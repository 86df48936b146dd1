"""How errors reach API clients: the services' django ValidationError becomes 400, a refused write
(a database constraint or frozen-batch guard) 409, and an oversized body 413 before it is read."""
import orjson
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.http import JsonResponse
from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response


def _detail(error: DjangoValidationError):
    if hasattr(error, "error_dict"):
        return {field: [str(m) for m in messages] for field, messages in error.message_dict.items()}
    return {"detail": " ".join(error.messages)}


def exception_handler(exc, context):
    # Imported here: rest_framework.views reads the parser setting, which names this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(_detail(exc))
    elif isinstance(exc, IntegrityError):
        # The services check first; this is the database refusing what slipped past (a race, a guard).
        return Response({"detail": f"Refused by the database: {exc}".strip()[:500]}, status=status.HTTP_409_CONFLICT)
    return drf_exception_handler(exc, context)


class RequestBodyLimitMiddleware:
    """413 from the Content-Length header alone, before a byte of an oversized body is read.

    Limits: DATA_UPLOAD_MAX_MEMORY_SIZE for ordinary bodies (JSON, forms), TANDEM_MAX_UPLOAD_BYTES
    for multipart file uploads (the staff import page). A body without Content-Length (chunked) is
    still capped by Django's own DATA_UPLOAD_MAX_MEMORY_SIZE check when it is read.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"detail": "Content-Length must be an integer."}, status=400)
        multipart = request.META.get("CONTENT_TYPE", "").startswith("multipart/form-data")
        limit = settings.TANDEM_MAX_UPLOAD_BYTES if multipart else settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length > limit:
            # (No "Connection: close" here: WSGI forbids hop-by-hop headers; the server deals with
            # the unread body.)
            return JsonResponse({"detail": f"Request body too large: {length} bytes, the limit is {limit}."},
                                status=413)
        return self.get_response(request)


class StrictJSONParser(JSONParser):
    """JSON bodies parsed by orjson: NaN/Infinity and lone surrogates ("\\ud800") are a 400 here,
    not a 500 later when PostgreSQL cannot store them (as NUL in text/jsonb would be)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = orjson.loads(stream.read() if stream is not None else b"")
        except orjson.JSONDecodeError as error:
            raise exceptions.ParseError(f"JSON parse error - {error}") from None
        try:
            nul = _has_nul(data)
        except RecursionError:
            raise exceptions.ParseError("JSON nested too deeply.") from None
        if nul:
            raise exceptions.ParseError("NUL characters are not allowed.")
        return data


def _has_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
