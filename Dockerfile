# llamaforge's OpenAI-compatible server (serve.py) on a checkpoint mounted at /models; the same image runs
# worker.py (the Redis job queue) with --entrypoint python. CPU by default; the README shows build and run.
FROM python:3.11-slim-bookworm

# torch first, from PyTorch's own index: its CPU wheels carry no CUDA libraries (hundreds of MB, not GBs).
# A CUDA index (--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cuXXX) gives the GPU build instead;
# either way requirements.txt then finds torch==2.13.0 installed (2.13.0+cpu is 2.13.0) and leaves it.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install --no-cache-dir -r requirements.txt

# the code last: editing a script rebuilds one small layer, not the dependencies
COPY . .
# not root: numeric ids, so Kubernetes' runAsNonRoot can check them without reading /etc/passwd
RUN groupadd --gid 10001 llamaforge && useradd --create-home --uid 10001 --gid 10001 llamaforge
USER 10001:10001

EXPOSE 8000
# 503 while the model loads (the port opens first), 200 once it serves; start-period covers a large checkpoint
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "serve.py", "--host=0.0.0.0", "--port=8000"]
CMD ["--checkpoint=/models"]
