# Everything runs from a project-local virtual environment (.venv, Python 3.10).
#   make setup  - create .venv and install torch, detectron2 and this project (idempotent)
#   make test   - run the test suite (sets up first when .venv is missing)
#   make lint   - flake8, isort and black checks (make format applies isort and black)
#   make demo   - train on the built-in shapes dataset on CPU, evaluate, draw predictions
#                 (DEMO_ITERS=N: a shorter schedule; DEMO_OPTS="KEY VALUE ...": config overrides)
#   make demo-panoptic - the same for Panoptic SOLOv2 (shapes over sky/water/ground; PQ)
# Bring your own detectron2: `make setup SKIP_DETECTRON2=1` (see README, "Installation").

PYTHON_VERSION ?= 3.10.13
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SKIP_DETECTRON2 ?= 0
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-panoptic lint format benchmark gpu-check clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements.txt
	@test -x $(PY) || PYENV_VERSION=$(PYTHON_VERSION) python3.10 -m venv $(VENV) || python3.10 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	@if [ "$(SKIP_DETECTRON2)" != "1" ]; then $(PIP) install -q "sal-detectron2==0.7.2"; \
	  else echo "SKIP_DETECTRON2=1: using the detectron2 already importable by $(PY)"; fi
	$(PIP) install -q --no-build-isolation -e ".[export,deploy,lvis,cityscapes,panoptic,transformers]" "numpy<2"
	$(PY) -c "import detectron2, solo; print('detectron2', detectron2.__version__, '| solo ready')"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Where the built-in shapes dataset is generated (same rule as solo.data.shapes.get_shapes_root).
SHAPES_ROOT ?= $(or $(SOLO_SHAPES_ROOT),$(if $(DETECTRON2_DATASETS),$(DETECTRON2_DATASETS)/shapes,datasets/shapes))
DEMO_CONFIG := configs/Shapes/SOLOv2_R18.yaml
DEMO_OUTPUT := output/shapes/SOLOv2_R18
# The shipped schedule is 1,700 iterations: 8 min 55 s end to end on a 2-core Xeon whose CPU has
# native bfloat16 (docs/data.md); CPUs without it train in float32, about a third slower (13.7
# min was reported on another Xeon). Shorter: `make demo DEMO_ITERS=300` (lower AP). Overrides
# for training and drawing: `make demo DEMO_OPTS="SOLVER.AMP.ENABLED False"`.
DEMO_ITERS ?=
DEMO_OPTS ?=
DEMO_OVERRIDES = $(if $(DEMO_ITERS),SOLVER.MAX_ITER $(DEMO_ITERS)) $(DEMO_OPTS)

demo: setup
	@echo "make demo: training $(or $(DEMO_ITERS),1700) iterations on $(DEMO_CONFIG) (1700: ~9 min" \
	  "on 2 cores with bfloat16, longer without; DEMO_ITERS=N to shorten)"
	$(PY) train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT) $(DEMO_OVERRIDES)
	$(PY) demo/demo.py --config-file $(DEMO_CONFIG) --input "$(SHAPES_ROOT)/val/00000*.png" \
	  --output $(DEMO_OUTPUT)/vis MODEL.WEIGHTS $(DEMO_OUTPUT)/model_final.pth $(DEMO_OPTS)
	@echo "Predictions drawn in $(DEMO_OUTPUT)/vis; metrics in $(DEMO_OUTPUT)/log.txt"

# Panoptic SOLOv2 on the panoptic shapes dataset (things over sky/water/ground): trains, evaluates
# PQ, PQ^Th, PQ^St (COCOPanopticEvaluator), mIoU and instance AP, draws stuff and things.
PANOPTIC_CONFIG := configs/Shapes/PanopticSOLOv2_R18.yaml
PANOPTIC_OUTPUT := output/shapes/PanopticSOLOv2_R18

demo-panoptic: setup
	$(PY) train_net.py --config-file $(PANOPTIC_CONFIG) OUTPUT_DIR $(PANOPTIC_OUTPUT)
	$(PY) demo/demo.py --config-file $(PANOPTIC_CONFIG) --input "$(SHAPES_ROOT)/val_panoptic/00000*.png" \
	  --output $(PANOPTIC_OUTPUT)/vis MODEL.WEIGHTS $(PANOPTIC_OUTPUT)/model_final.pth
	@echo "Panoptic results drawn in $(PANOPTIC_OUTPUT)/vis; PQ and AP in $(PANOPTIC_OUTPUT)/log.txt"

benchmark: setup
	$(PY) tools/benchmark.py --config-file configs/SOLOv2/R50_3x.yaml --task inference --compare mask_rcnn --repeats 10

# On a machine with CUDA: the CUDA tests, then GPU benchmarks vs Mask R-CNN (one JSON, a table).
gpu-check: setup
	$(PY) tools/gpu_check.py

LINT_PATHS := projects tests tools demo train_net.py

lint: setup
	$(PY) -m flake8 $(LINT_PATHS)
	$(PY) -m isort --check-only --diff $(LINT_PATHS)
	$(PY) -m black -l 100 --check $(LINT_PATHS)

format: setup
	$(PY) -m isort $(LINT_PATHS)
	$(PY) -m black -l 100 -q $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info projects/SOLO/*.egg-info
