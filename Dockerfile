FROM python:3.11-slim

# `pip install .` installs the packages whole (the Lua scripts and migrations are package data),
# the dependencies and the `inventory` command.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/srv/inventory

WORKDIR /srv/inventory
COPY setup.cfg pyproject.toml README.md ./
COPY app ./app
COPY persistence ./persistence
COPY jobs ./jobs
COPY lua ./lua
COPY wsgi.py ./
RUN pip install . \
    && useradd --system --create-home --uid 10001 inventory

USER inventory
EXPOSE 8000
# the web server of WEB_SERVER (app/webserver.py: gunicorn-gthread by default, granian, gunicorn-sync)
CMD ["python", "-m", "app.webserver"]
