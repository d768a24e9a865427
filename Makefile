# make test | make grid [CONFIGS=... SEEDS="0 1" JOBS=2 ARGS="--max_timesteps=1000"] | make grid-minari [...] | make results [RUNS=runs]
# make table [TF32=false ARGS=...]: CORL's offline locomotion table (18 configs x 4 seeds, in stacks, TF32) into runs/table
PYTHON ?= python
# CORL's offline locomotion benchmark: halfcheetah, hopper, walker2d x 6 D4RL datasets.
LOCOMOTION := $(sort $(wildcard configs/offline/cql/halfcheetah/*_v2.yaml configs/offline/cql/hopper/*_v2.yaml configs/offline/cql/walker2d/*_v2.yaml))
CONFIGS ?= $(LOCOMOTION)
# Minari's MuJoCo locomotion datasets: halfcheetah, hopper, walker2d, ant x simple, medium, expert (v5 envs).
MINARI_LOCOMOTION := $(sort $(wildcard configs/offline/cql/*/*_v0_minari.yaml))
SEEDS ?= 0 1 2 3
JOBS ?= 1
PROGRAM ?= algorithms/offline/cql.py
ARGS ?=
RUNS ?= runs
TF32 ?= true

.PHONY: test grid grid-minari table results lint-dockerfile

test:
	$(PYTHON) -m pytest -q

grid:
	$(PYTHON) scripts/run_grid.py --program $(PROGRAM) --configs $(CONFIGS) --seeds $(SEEDS) --jobs $(JOBS) -- $(ARGS)

grid-minari:
	$(MAKE) grid CONFIGS="$(MINARI_LOCOMOTION)"

# Re-running it after a stop resumes the stopped stacks and skips the finished ones (scripts/run_grid.py).
table:
	$(PYTHON) scripts/run_grid.py --program algorithms/offline/cql.py --configs $(LOCOMOTION) --seeds 0 1 2 3 \
		--stack yes --out runs/table -- --tf32=$(TF32) $(ARGS)
	$(PYTHON) tools/results.py runs/table --csv runs/table/results.csv --plots runs/table/plots

results:
	$(PYTHON) tools/results.py $(RUNS) --csv $(RUNS)/results.csv --plots $(RUNS)/plots

lint-dockerfile:
	bash tools/lint_dockerfile.sh
