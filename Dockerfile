# One image for the four services and the HTTP door; the command picks the process:
#   docker run strata python -m services.orchestrator
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt requirements-nodeps.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-nodeps.txt

COPY pyproject.toml ./
COPY gen ./gen
COPY services ./services
COPY strata_cli ./strata_cli
COPY config ./config
RUN pip install --no-deps . && useradd --uid 10001 --no-create-home strata

USER strata
EXPOSE 50051 50052 50053 50054 8080
CMD ["python", "-m", "services.orchestrator"]
