#!/usr/bin/env bash
# One batched GPU session on the lent device: environment, GPU tests, the example, benchmarks.
#   bash benchmarks/device_run.sh [tests] [example] [step255] [step1.4b] [fakeworld] [adamw]
#        [timeline] [mempeak255] [mempeak1.4b] [fp16curve] [scaling] [profile255]
#        [stepds255] [stepds1.4b] [offload1.4b] [offload3.9b] [offload3.9b-more] [offload3.9b-nvme] [offload3.9b-repeat] [offload3.9b-expandable] [offload3.9b-alloc] [offload3.9b-hostcap] [offload3.9b-hostcap40] [oomtests] [hostcredit] [offloadquick] [nvme255] [step14] [llama1b] [llama1b-quick]
# DeepSpeed joins the step benchmark when its wheel is in .whl/, made here with CPU torch:
#   pip download --no-deps --no-binary :all: deepspeed && DS_BUILD_OPS=0 pip wheel --no-deps \
#     --no-build-isolation deepspeed-*.tar.gz -w .whl
#   pip download --no-deps --only-binary :all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl hjson pydantic pydantic-core annotated-types \
#     typing-inspection
# (the image has DeepSpeed's other requirements); its FusedAdam is JIT-built for sm_90.
# Logs go to $OUT (or ./out). The GPU image lacks optree: wheels in .whl/ are installed first.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's JIT build of FusedAdam: Hopper only
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/env.txt"
for task in "$@"; do
  case $task in
    tests) python3 -m pytest tests/gpu tests/multigpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    example) python3 examples/train_gpt.py --stage 3 --bf16 --steps 200 --log-every 50 --n-layer 6 --n-embd 256 2>&1 | tee "$OUT/example.log" ;;
    step255) python3 benchmarks/step.py --models 255m --impls fsdp2 fsdp2:emb torch fzero:3 fzero:3+emb fzero:2 fzero:1 fzero:3+compile --steps 20 --warmup 5 --json "$OUT/step_255m.json" 2>&1 | tee "$OUT/step_255m.log" ;;
    stepds1.4b) python3 benchmarks/step.py --models 1.4b --impls fsdp2 deepspeed:3 --steps 10 --warmup 3 --json "$OUT/step_1.4b_ds.json" 2>&1 | tee "$OUT/step_1.4b_ds.log" ;;
    step1.4b) python3 benchmarks/step.py --models 1.4b --impls fsdp2 fsdp2:emb torch fzero:3 fzero:3+emb --steps 10 --warmup 3 --json "$OUT/step_1.4b.json" 2>&1 | tee "$OUT/step_1.4b.log" ;;
    fakeworld) python3 benchmarks/step.py --models 1.4b --impls fzero:3@8 fzero:3@64 --steps 5 --warmup 2 --json "$OUT/fake_world.json" 2>&1 | tee "$OUT/fake_world.log" ;;
    timeline) python3 benchmarks/timeline.py --model 255m --out "$OUT" 2>&1 | tee "$OUT/timeline.log" ;;
    adamw) python3 benchmarks/adamw.py 2>&1 | tee "$OUT/adamw.log" ;;
    mempeak255) python3 benchmarks/memory_peak.py --model 255m --impls fsdp2 fzero:3 --json "$OUT/mempeak_255m.json" 2>&1 | tee "$OUT/mempeak_255m.log" ;;
    mempeak1.4b) python3 benchmarks/memory_peak.py --model 1.4b --impls fsdp2 fzero:3 --json "$OUT/mempeak_1.4b.json" 2>&1 | tee "$OUT/mempeak_1.4b.log" ;;
    stepds255) python3 benchmarks/step.py --models 255m --impls fsdp2 fzero:3 deepspeed:3 --steps 20 --warmup 5 --json "$OUT/step_255m_ds.json" 2>&1 | tee "$OUT/step_255m_ds.log" ;;
    scaling) python3 benchmarks/scaling.py --model 1.4b --worlds 1 2 4 8 --out "$OUT" --json "$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.log" ;;
    profile255) python3 benchmarks/profile_step.py --model 255m --impls fsdp2 fzero:3 2>&1 | tee "$OUT/profile_255m.log" ;;
    offload1.4b) python3 benchmarks/offload.py --model 1.4b --json "$OUT/offload_1.4b.json" 2>&1 | tee "$OUT/offload_1.4b.log" ;;
    offload3.9b) python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls fzero:3+opt+r0.85 fzero:3+opt+r0.8 deepspeed:3+opt+param --steps 3 --warmup 1 --json "$OUT/offload_3.9b.json" 2>&1 | tee "$OUT/offload_3.9b.log" ;;
    offload3.9b-more) python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls fzero:3+opt+param fzero:3+opt+param+r0.7 deepspeed:3+opt+param fsdp2:offload --steps 3 --warmup 1 --json "$OUT/offload_3.9b_more.json" 2>&1 | tee "$OUT/offload_3.9b_more.log" ;;
    offload3.9b-nvme) mkdir -p /tmp/nvme && python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls fzero:3+opt+nvme --nvme-dir /tmp/nvme --steps 2 --warmup 1 --json "$OUT/offload_3.9b_nvme.json" 2>&1 | tee "$OUT/offload_3.9b_nvme.log" ;;
    offload3.9b-repeat) python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls fzero:3+opt+r0.85 deepspeed:3+opt+param fzero:3+opt+param+r0.7 --steps 3 --warmup 1 --json "$OUT/offload_3.9b_repeat.json" 2>&1 | tee "$OUT/offload_3.9b_repeat.log" ;;
    offload3.9b-expandable) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls fzero:3+opt+r0.8 deepspeed:3+opt+param fzero:3+opt+r0.85 fsdp2:offload --steps 3 --warmup 1 --json "$OUT/offload_3.9b_expandable.json" 2>&1 | tee "$OUT/offload_3.9b_expandable.log" ;;
    offload3.9b-alloc)  # DeepSpeed with the default allocator and with expandable segments, fzero's r0.8 (which needs them) between
      for row in "deepspeed:3+opt+param default" "fzero:3+opt+r0.8 expandable" "deepspeed:3+opt+param expandable"; do
        set -- $row
        if [ "$2" = expandable ]; then export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; else unset PYTORCH_CUDA_ALLOC_CONF; fi
        python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --impls "$1" --steps 3 --warmup 1 --json "$OUT/offload_3.9b_alloc_${1//[:+]/_}_$2.json" 2>&1 | tee -a "$OUT/offload_3.9b_alloc.log"
      done; unset PYTORCH_CUDA_ALLOC_CONF ;;
    offload3.9b-hostcap) mkdir -p /tmp/nvme && python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --host-memory-gib 46 --impls fzero:3+opt+nvme fzero:3+opt+r0.85 --nvme-dir /tmp/nvme --steps 2 --warmup 1 --json "$OUT/offload_3.9b_hostcap.json" 2>&1 | tee "$OUT/offload_3.9b_hostcap.log" ;;
    offload3.9b-hostcap40) mkdir -p /tmp/nvme && python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --host-memory-gib 40 --impls fzero:3+opt+nvme fzero:3+opt+r0.85 --nvme-dir /tmp/nvme --steps 2 --warmup 1 --json "$OUT/offload_3.9b_hostcap40.json" 2>&1 | tee "$OUT/offload_3.9b_hostcap40.log" ;;
    oomtests) python3 -m pytest tests/gpu/test_cuda_oom.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_oom_tests.log" | tail -8 ;;
    hostcredit) python3 -m pytest tests/gpu/test_cuda_offload.py -q -p no:cacheprovider -k "release" 2>&1 | tail -3 | tee "$OUT/gpu_hostcredit_tests.log"
      python3 benchmarks/offload.py --model 3.9b --gpu-memory-gib 24 --ckpt --host-memory-gib 56 --impls fzero:3+opt+r0.85 --steps 2 --warmup 1 --json "$OUT/offload_3.9b_hostcap56.json" 2>&1 | tee "$OUT/offload_3.9b_hostcap56.log" ;;
    nvme255) mkdir -p /tmp/nvme && python3 benchmarks/nvme_offload.py --dir /tmp/nvme --model 255m --json "$OUT/nvme_255m.json" 2>&1 | tee "$OUT/nvme_255m.log" ;;
    offloadquick) python3 benchmarks/offload.py --model 1.4b --impls fzero:3 fzero:2+opt fzero:3+opt fzero:3+opt+param fzero:3+opt+r0.6 deepspeed:2+opt deepspeed:3+opt+r0.6 --json "$OUT/offload_1.4b.json" 2>&1 | tee "$OUT/offload_1.4b.log" ;;
    step14) python3 benchmarks/step.py --models 1.4b --impls fsdp2 torch fzero:3 --steps 10 --warmup 3 --json "$OUT/step_1.4b.json" 2>&1 | tee "$OUT/step_1.4b.log" ;;
    llama1b) python3 benchmarks/hf_llama.py --steps 20 --warmup 3 --json "$OUT/llama_1b.json" 2>&1 | tee "$OUT/llama_1b.log" ;;
    llama1b-quick) python3 benchmarks/hf_llama.py --impls fzero:3+ckpt fsdp2+ckpt trainer:3+ckpt train_step:3+ckpt --steps 5 --warmup 2 --json "$OUT/llama_1b_quick.json" 2>&1 | tee "$OUT/llama_1b_quick.log" ;;
    fp16curve) for lr in 1e-3 3e-3; do python3 benchmarks/precision.py --fp16-curve --with-plain --lr $lr --lr-warmup 20 2>&1 | tee "$OUT/fp16_curve_lr${lr}_warmup20.log"; done ;;
  esac
done
