# The production Dockerfile the article recommends: a slim base, a multi-stage
# build, the dependency manifest copied and installed before the source, and a
# non-root user.
FROM python:3.11-slim AS build
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --prefix=/install -r requirements.txt
COPY . .

FROM python:3.11-slim
WORKDIR /app
RUN useradd --create-home --no-log-init --uid 10001 app
COPY --from=build /install /usr/local
COPY --from=build /app /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health')"]
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "app:app"]
