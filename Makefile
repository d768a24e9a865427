# make test | make grid [CONFIGS=... SEEDS="0 1" JOBS=2 ARGS="--max_timesteps=1000"] | make grid-minari [...] | make results [RUNS=runs]
PYTHON ?= python
# CORL's offline locomotion benchmark: halfcheetah, hopper, walker2d x 6 D4RL datasets.
CONFIGS ?= $(sort $(wildcard configs/offline/cql/halfcheetah/*_v2.yaml configs/offline/cql/hopper/*_v2.yaml configs/offline/cql/walker2d/*_v2.yaml))
# Minari's MuJoCo locomotion datasets: halfcheetah, hopper, walker2d, ant x simple, medium, expert (v5 envs).
MINARI_LOCOMOTION := $(sort $(wildcard configs/offline/cql/*/*_v0_minari.yaml))
SEEDS ?= 0 1 2 3
JOBS ?= 1
PROGRAM ?= algorithms/offline/cql.py
ARGS ?=
RUNS ?= runs

.PHONY: test grid grid-minari results lint-dockerfile

test:
	$(PYTHON) -m pytest -q

grid:
	$(PYTHON) scripts/run_grid.py --program $(PROGRAM) --configs $(CONFIGS) --seeds $(SEEDS) --jobs $(JOBS) -- $(ARGS)

grid-minari:
	$(MAKE) grid CONFIGS="$(MINARI_LOCOMOTION)"

results:
	$(PYTHON) tools/results.py $(RUNS) --csv $(RUNS)/results.csv --plots $(RUNS)/plots

lint-dockerfile:
	bash tools/lint_dockerfile.sh
