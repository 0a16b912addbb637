#!/usr/bin/env bash
# The GPU checks, as one script for a lent accelerator (CI has none; these tests skip there).
#   bash benchmarks/gpu_checks.sh
# Runs the CUDA tests (fp16/bf16 AMP training, a one-GPU nccl torchrun job, FSDP2 sharded training over
# nccl in bf16 and fp16 on every GPU, the CUDA execution provider when onnxruntime-gpu is installed) and the fp16 and bf16 AMP step-throughput ratios for
# resnet50. Set MLOPT_PYTHONPATH to add directories holding mlopt's dependencies.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${MLOPT_PYTHONPATH:+$MLOPT_PYTHONPATH:}$PWD"
nvidia-smi -L || true
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('onnxruntime', o.__version__, o.get_available_providers())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/compress/test_gpu.py tests/quant/test_ptq.py -rs
python3 benchmarks/amp_throughput.py --device cuda --model resnet50 --batch-size 64 --steps 30 --amp fp16
python3 benchmarks/amp_throughput.py --device cuda --model resnet50 --batch-size 64 --steps 30 --amp bf16
python3 benchmarks/amp_throughput.py --device cuda --model resnet50 --batch-size 128 --steps 30 --amp fp16
python3 benchmarks/amp_throughput.py --device cuda --model resnet50 --batch-size 256 --steps 12 --amp fp16
