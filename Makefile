# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install postgres browser secrets lock lint bench docs clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# the distributions' names before safe-distillation-box[-client]: a .venv made then would hold both
	$(BIN)/pip uninstall --quiet -y sdb sdb-client 2>/dev/null || true
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DATA_DIR ?= $(or $(SDB_DATA_DIR),.sdb)
URL      := http://127.0.0.1:8000

# Builds the demo bundle on first run (reused later; rebuilt if it was sealed before key binding 2),
# then serves it. The master key and
# pepper are created in $(DATA_DIR)-secrets (mode 0700, git-ignored), never in the repo.
run: $(STAMP)
	@grep -qs '"key_binding": 2' $(DATA_DIR)/bundles/mnist-demo/meta.json || SDB_DATA_DIR=$(DATA_DIR) $(BIN)/sdb demo
	@echo ""
	@echo "SDB on $(URL) (docs: $(URL)/docs). Predict, anyone:"
	@echo "  $(BIN)/python -c 'import json; print(json.dumps({\"inputs\": [[0.0]*784], \"top_k\": 3}))' | curl -s -H 'content-type: application/json' -d @- $(URL)/v1/models/mnist-demo/predict"
	@echo "Distillable logits need a key (printed alone on the last line):"
	@echo "  KEY=\$$($(BIN)/sdb keys create --data-dir $(DATA_DIR) --scopes distill --models mnist-demo | tail -1)"
	@echo "  ... | curl -s -H \"Authorization: Bearer \$$KEY\" -H 'content-type: application/json' -d @- $(URL)/v1/models/mnist-demo/distill"
	@echo ""
	SDB_DATA_DIR=$(DATA_DIR) $(BIN)/sdb serve --host 127.0.0.1 --port 8000

# The store tests run on SQLite and on PostgreSQL: they start a throwaway PostgreSQL cluster
# themselves (tests/service/pgcluster.py), which needs the server binaries. As root on
# Debian/Ubuntu this installs them; anyone else is told the command.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "the tests need the PostgreSQL server: sudo apt-get install -y postgresql"; exit 1; fi

# The console's tests (tests/browser/) drive a real headless Chromium through its driver. As root on
# Debian/Ubuntu this installs Debian's chromium and chromium-driver; anyone else is told the command.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "the console's browser tests need Chromium: sudo apt-get install -y chromium chromium-driver"; exit 1; fi

# Two processes (pytest-xdist), a test file each at a time: most of the suite waits on servers, workers
# and Ray it starts, and its torch runs one thread (tests/conftest.py), so one process leaves a core idle.
# A file stays in one process because its module fixtures (trained models, a served app) are built once.
TEST_WORKERS ?= 2
test: $(STAMP) postgres browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# docker-compose.yml's secrets: 32 random bytes each, hex, made once and kept, in a directory
# private to you. Each file is mode 0600 and owned by the image's user (uid 10001), who reads it
# through compose's bind mount (compose cannot set a file secret's owner or mode); the database
# password is 0640 with PostgreSQL's group (gid 999 in its image), which reads it too. The server
# refuses secrets others can read. Changing owners needs root: sudo when you are not.
IMAGE_UID := 10001
PG_GID    := 999
SUDO      := $(if $(filter 0,$(shell id -u)),,sudo)
SECRETS := secrets/master.key secrets/pepper.key secrets/db_password secrets/ray_token
secrets: $(SECRETS)
$(SECRETS):
	@mkdir -p secrets && chmod 700 secrets
	@umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $@ && echo >> $@
	@if [ "$@" = secrets/db_password ]; then chmod 640 $@ && $(SUDO) chown $(IMAGE_UID):$(PG_GID) $@; \
	 else chmod 600 $@ && $(SUDO) chown $(IMAGE_UID):$(IMAGE_UID) $@; fi || { rm -f $@; exit 1; }
	@echo "created $@ (owner uid $(IMAGE_UID))"

# requirements.lock (what the Docker image installs) from the versions tested in this venv.
lock: $(STAMP)
	$(BIN)/python deploy/lock.py

# The gRPC stubs in service/grpc/ (committed) from its grpc_predict_v2.proto, with a pinned grpcio-tools
# in a venv of its own (build/grpc-tools): run after editing the .proto.
.PHONY: grpc
grpc:
	$(PYTHON) service/grpc/generate.py

lint: $(STAMP)
	$(BIN)/ruff check sdb_core service sdb_cli tests benchmarks clients/python

bench: $(STAMP)
	$(BIN)/python benchmarks/protection.py --data mnist-5k --seeds 0 1 2 --json benchmarks/results/protection.json

# The documentation site (mkdocs.yml, docs/) into site/; the docs extra is installed on demand.
docs: $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	$(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .pytest_cache
