# Image for every Lodestar service (dispatcher, worker, learner, emulator); the command picks the role.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lodestar ./lodestar
COPY app ./app
COPY dispatcher ./dispatcher
COPY workers ./workers
COPY learner ./learner
COPY sim ./sim
COPY configs ./configs
RUN pip install --no-cache-dir .
# Run as an unprivileged user (the Helm chart runs every pod as 10001 with a read-only root filesystem);
# the learner's default checkpoint folder is created for it, so a fresh volume mounted there is writable.
RUN useradd --uid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lodestar \
    && mkdir -p /app/.run/learner && chown -R 10001:10001 /app/.run
USER 10001
ENV LODESTAR_CONFIG=/app/configs/lodestar.yaml
ENTRYPOINT ["lodestar"]
