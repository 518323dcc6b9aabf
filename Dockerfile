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
ENV LODESTAR_CONFIG=/app/configs/lodestar.yaml
ENTRYPOINT ["lodestar"]
