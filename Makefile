# make test | make grid [CONFIGS=... SEEDS="0 1" JOBS=2 ARGS="--max_timesteps=1000"] | make results [RUNS=runs]
PYTHON ?= python
# CORL's offline locomotion benchmark: halfcheetah, hopper, walker2d x 6 datasets.
CONFIGS ?= $(sort $(wildcard configs/offline/cql/halfcheetah/*.yaml configs/offline/cql/hopper/*.yaml configs/offline/cql/walker2d/*.yaml))
SEEDS ?= 0 1 2 3
JOBS ?= 1
PROGRAM ?= algorithms/offline/cql.py
ARGS ?=
RUNS ?= runs

.PHONY: test grid results lint-dockerfile

test:
	$(PYTHON) -m pytest -q

grid:
	$(PYTHON) scripts/run_grid.py --program $(PROGRAM) --configs $(CONFIGS) --seeds $(SEEDS) --jobs $(JOBS) -- $(ARGS)

results:
	$(PYTHON) tools/results.py $(RUNS) --csv $(RUNS)/results.csv --plots $(RUNS)/plots

lint-dockerfile:
	bash tools/lint_dockerfile.sh
