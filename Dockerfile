# One image for every Agora process (gateway, fanout, scores, migrate): see docker-compose.yml.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage storage
COPY fanout fanout
COPY gateway gateway
COPY agora_client agora_client
RUN pip install . && useradd --system --no-create-home agora
USER agora
EXPOSE 8000 9464
CMD ["agora", "gateway", "--host", "0.0.0.0", "--port", "8000"]
