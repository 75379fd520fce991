# The two set-up commands: `make run` starts the app, `make test` runs every test.
# Each installs what it needs: system packages, the venv and the pinned pip packages.
#
# TORCH_BUILD picks the torch build (scripts/torch_build.sh): auto (default: the CUDA
# build when `nvidia-smi` lists a GPU, else the CPU one), cpu, cuda, or cuXYZ (e.g.
# cu128: PyTorch's own index for that CUDA version). A CUDA build has its own install
# stamp, so asking for one reinstalls torch; the CPU install is the plain pinned one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
TORCH_BUILD ?= auto
TORCH := $(shell TORCH_BUILD='$(TORCH_BUILD)' bash scripts/torch_build.sh build)
ifeq ($(TORCH),)
$(error TORCH_BUILD=$(TORCH_BUILD): use auto, cpu, cuda or cuXYZ, e.g. cu128)
endif
STAMP := $(VENV)/.installed$(if $(filter cpu,$(TORCH)),,-torch-$(TORCH))

.PHONY: run test bench install default-data default-run agnostic-many-run scenes many-scenes corpus corpus-manifest small-cities

$(STAMP): requirements.txt scripts/install_system.sh
	bash scripts/install_system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(shell TORCH_BUILD=$(TORCH) bash scripts/torch_build.sh pip-args)
	TORCH_BUILD=$(TORCH) bash scripts/torch_build.sh check $(PY)
	rm -f $(VENV)/.installed $(VENV)/.installed-torch-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT)

# two pytest workers (pytest-xdist), one per core; --dist loadfile keeps a module's tests on one
# worker, so its module fixtures (a traced scene, a Ray cluster, a Streamlit server) are built once
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) -m core bench physics

# The shipped trained model: configs/model.yaml on datasets/etoile + radio_maps/etoile.zarr
# (about 10 minutes on a 2-core CPU). last.pt (optimizer state) is dropped to keep it small.
default-run: $(STAMP)
	rm -rf runs/default_run
	$(PY) -m core train --config configs/model.yaml --out runs/default_run --no-progress
	$(PY) -m core evaluate --run runs/default_run --refine --baselines
	rm -f runs/default_run/last.pt
	rm -rf assets/default_run && cp -r runs/default_run assets/default_run

# The shipped many-city run: the scene-agnostic model (configs/agnostic.yaml) on etoile, florence and the two street
# canyons, munich held out, with its evaluation on munich, never trained on (about 15 min of training and 1 min of
# evaluation on a 2-core CPU; docs/model.md "The shipped many-city run"). last.pt is dropped to keep it small.
agnostic-many-run: $(STAMP)
	rm -rf runs/agnostic_many
	$(PY) -m core train --config configs/agnostic.yaml --set 'data.datasets=[datasets/etoile, datasets/florence, datasets/simple_street_canyon, datasets/simple_street_canyon_with_cars]' --set data.holdout_scene=munich --set training.epochs=10 --out runs/agnostic_many --no-progress
	$(PY) -m core evaluate --run runs/agnostic_many --scene munich --refine --no-progress
	rm -f runs/agnostic_many/last.pt
	rm -rf assets/agnostic_many && cp -r runs/agnostic_many assets/agnostic_many

# Rebuild the shipped default data: etoile's radio map and its measurement datasets (the oracle world and the
# realistic one: the same walks traced in a perturbed twin, docs/world.md). The shipped stores are
# read-only to every command (core/stores/output.py); CORE_WRITE_SHIPPED=1 lifts that for these two targets.
default-data: $(STAMP)
	CORE_WRITE_SHIPPED=1 $(PY) -m core generate-maps --scenes etoile --radio-maps radio_maps --resolution 1.0 --map-size 512 512 --force
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-dataset --scene etoile --num-ues 20000 --reports 8 --out datasets/etoile --radio-maps radio_maps --seed 0 --force
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-dataset --scene etoile --num-ues 20000 --reports 8 --out datasets/etoile_realistic --radio-maps radio_maps --seed 0 --world realistic --force

# The other shipped scenes (issue 11): radio maps with diffraction (format 3, default settings: each map fits
# its scene, at most 512 x 512 cells of 1 m) and 3,000-UE datasets, one Ray task per scene on a local Ray
# (about 20 minutes on a 2-core CPU). florence's sites: configs/sites/florence.yaml (python -m core place-sites).
scenes: $(STAMP)
	CORE_WRITE_SHIPPED=1 $(PY) -m core generate-maps --scenes munich florence simple_street_canyon simple_street_canyon_with_cars --radio-maps radio_maps --force --ray
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-dataset --scene munich florence simple_street_canyon simple_street_canyon_with_cars --num-ues 3000 --reports 8 --out datasets --radio-maps radio_maps --force --ray

# One model on four scenes, evaluated on munich, never trained on (with and without MAP on munich's map).
many-scenes: $(STAMP)
	$(PY) -m core train --config configs/model.yaml --set 'data.datasets=[datasets/etoile, datasets/florence, datasets/simple_street_canyon, datasets/simple_street_canyon_with_cars]' --set data.holdout_scene=munich --set training.epochs=20 --out runs/many_scenes --force --no-progress
	$(PY) -m core evaluate --run runs/many_scenes --scene munich --refine

# The procedural-city corpus (issue 18, docs/cities.md): 100 varied cities with their maps and datasets, one Ray
# task per city on a local Ray; rerunning resumes (finished cities are skipped). CORPUS=... RAY=HOST:PORT for a cluster,
# CORPUS_CPUS=1 to give the local Ray one core. corpus-manifest copies the built corpus' manifest to the shipped one.
CORPUS ?= corpus
CORPUS_COUNT ?= 102# seeds 21 and 37 fail the coverage check: 102 seeds give 100 complete cities
corpus: $(STAMP)
	$(PY) -m core make-corpus --count $(CORPUS_COUNT) --out $(CORPUS) --ray $(RAY) $(if $(CORPUS_CPUS),--num-cpus $(CORPUS_CPUS)) --no-progress
corpus-manifest:
	mkdir -p assets/corpus && cp $(CORPUS)/manifest.json assets/corpus/manifest.json

# The three shipped small cities (issue 18): 128 m, 3 sites each, their 2 m maps and 1,000-walk datasets (a few minutes).
SMALL_CITIES = small_grid small_irregular small_hills
small-cities: $(STAMP)
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-city --seed 101 --size-m 128 --block-m 40 --street-width-m 12 --layout grid --sites 3 --name small_grid --out scenes --force
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-city --seed 102 --size-m 128 --block-m 40 --street-width-m 12 --layout irregular --sites 3 --name small_irregular --out scenes --force
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-city --seed 103 --size-m 128 --block-m 40 --street-width-m 12 --layout perturbed --sites 3 --terrain-m 3 --vehicles 6 --name small_hills --out scenes --force
	CORE_WRITE_SHIPPED=1 $(PY) -m core generate-maps --scenes $(SMALL_CITIES) --resolution 2 --radio-maps radio_maps --force --no-progress
	CORE_WRITE_SHIPPED=1 $(PY) -m core make-dataset --scene $(SMALL_CITIES) --num-ues 1000 --reports 8 --radio-maps radio_maps --out datasets --force --no-progress
