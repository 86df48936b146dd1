FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# On Linux the registry's torch of this version is the CUDA build the GPU workers need.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY webapp webapp
COPY annotation annotation
COPY rewards rewards
COPY policy policy
COPY workers workers
COPY manage.py .
RUN pip install --no-cache-dir . \
    && DJANGO_SETTINGS_MODULE=webapp.settings python manage.py collectstatic --noinput -v0
RUN useradd --create-home tandem && mkdir /data && chown tandem /data
USER tandem
EXPOSE 8000
