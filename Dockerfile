# One image for both services; the command chooses: python -m deploy_svc (the default),
# python -m audit_svc, or the migration step (see docker-compose.yml).
FROM python:3.11-slim AS build
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY protos protos
COPY shared shared
COPY deploy_svc deploy_svc
COPY audit_svc audit_svc
COPY migrations migrations
# The generated gRPC code is built into the image (never committed to the repository).
RUN pip install --no-cache-dir "grpcio-tools==1.85.1" \
 && mkdir -p relman/v1 \
 && python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/relman/v1/*.proto \
 && touch relman/__init__.py relman/v1/__init__.py

FROM python:3.11-slim
WORKDIR /app
COPY --from=build /app /app
# audit_svc's signing key lives in /var/lib/relman/keys, deploy_svc's webhook secret key
# in /var/lib/relman/webhook-keys, each the non-root user's own directory (0700): mount a
# volume on each (docker-compose.yml: audit_keys, webhook_keys), which a new named volume
# copies, owner and mode included. Each key is made there at first start, mode 0600.
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /app relman \
 && install -d -m 0700 -o relman -g relman /var/lib/relman/keys \
 && install -d -m 0700 -o relman -g relman /var/lib/relman/webhook-keys
USER relman
ENV PYTHONUNBUFFERED=1 \
    AUDIT_SIGNING_KEY_FILE=/var/lib/relman/keys/audit-signing-key.pem \
    WEBHOOK_SECRET_KEY_FILE=/var/lib/relman/webhook-keys/webhook-secret-key
EXPOSE 50051 50052 9101 9102
CMD ["python", "-m", "deploy_svc"]
