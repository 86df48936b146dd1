"""The annotation side's REST API (/api/v1/): filters, serializers, views. URLs: annotation/api_urls.py."""
