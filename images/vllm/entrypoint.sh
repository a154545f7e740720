#!/bin/bash
# Start `vllm serve` from TRACKB_VLLM_* environment variables (set by the Job spec or
# `docker run -e`); any container arguments are appended as extra `vllm serve` flags.
#
#   TRACKB_VLLM_MODEL                   model id or local path (required)
#   TRACKB_VLLM_SERVED_MODEL_NAME       name clients use (default: the model id)
#   TRACKB_VLLM_REVISION                model revision (branch, tag or commit)
#   TRACKB_VLLM_DTYPE                   auto|half|float16|bfloat16|float|float32 (image: half, as T4 lacks bf16)
#   TRACKB_VLLM_MAX_MODEL_LEN           context length in tokens (default: the model's)
#   TRACKB_VLLM_GPU_MEMORY_UTILIZATION  share of GPU memory vLLM may take, 0 < x <= 1 (image: 0.90)
#   TRACKB_VLLM_TENSOR_PARALLEL_SIZE    GPUs to shard over (image: 1)
#   TRACKB_VLLM_MAX_LORA_RANK           when set, enable LoRA adapters up to this rank
#   TRACKB_VLLM_ATTENTION_BACKEND       --attention-backend, e.g. TRITON_ATTN on T4s (compute
#                                       7.5; FlashAttention needs 8.0); unset: vLLM chooses
#   TRACKB_VLLM_HOST / _LISTEN_PORT     bind address and port (image: 0.0.0.0, 8000)
#   HF_TOKEN, VLLM_API_KEY              read by huggingface_hub and vLLM themselves; never put on
#                                       the command line, where `ps` would show them
#
# A bad value ends with one line on stderr and exit code 64 (EX_USAGE), which trackb's Job
# specs treat as permanent (podFailurePolicy FailJob): retrying cannot fix a typo.
set -euo pipefail

die() {
    echo "trackb-vllm: error: $*" >&2
    exit 64
}

is_posint() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

model="${TRACKB_VLLM_MODEL:-}"
[[ -n "$model" ]] || die "TRACKB_VLLM_MODEL is not set (a Hugging Face model id or a local path)"

dtype="${TRACKB_VLLM_DTYPE:-half}"
case "$dtype" in
    auto | half | float16 | bfloat16 | float | float32) ;;
    *) die "TRACKB_VLLM_DTYPE=$dtype: expected auto, half, float16, bfloat16, float or float32" ;;
esac

gpu_util="${TRACKB_VLLM_GPU_MEMORY_UTILIZATION:-0.90}"
# 0.x or 1 / 1.0: a share of the GPU's memory.
[[ "$gpu_util" =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] \
    || die "TRACKB_VLLM_GPU_MEMORY_UTILIZATION=$gpu_util: expected a number in (0, 1]"

tp="${TRACKB_VLLM_TENSOR_PARALLEL_SIZE:-1}"
is_posint "$tp" || die "TRACKB_VLLM_TENSOR_PARALLEL_SIZE=$tp: expected a positive integer"

port="${TRACKB_VLLM_LISTEN_PORT:-8000}"
{ is_posint "$port" && ((port <= 65535)); } \
    || die "TRACKB_VLLM_LISTEN_PORT=$port: expected a port number (1-65535)"

args=(
    --host "${TRACKB_VLLM_HOST:-0.0.0.0}"
    --port "$port"
    --dtype "$dtype"
    --gpu-memory-utilization "$gpu_util"
    --tensor-parallel-size "$tp"
)

if [[ -n "${TRACKB_VLLM_SERVED_MODEL_NAME:-}" ]]; then
    args+=(--served-model-name "$TRACKB_VLLM_SERVED_MODEL_NAME")
fi
if [[ -n "${TRACKB_VLLM_REVISION:-}" ]]; then
    args+=(--revision "$TRACKB_VLLM_REVISION")
fi
if [[ -n "${TRACKB_VLLM_MAX_MODEL_LEN:-}" ]]; then
    is_posint "$TRACKB_VLLM_MAX_MODEL_LEN" \
        || die "TRACKB_VLLM_MAX_MODEL_LEN=$TRACKB_VLLM_MAX_MODEL_LEN: expected a positive integer"
    args+=(--max-model-len "$TRACKB_VLLM_MAX_MODEL_LEN")
fi
if [[ -n "${TRACKB_VLLM_MAX_LORA_RANK:-}" ]]; then
    is_posint "$TRACKB_VLLM_MAX_LORA_RANK" \
        || die "TRACKB_VLLM_MAX_LORA_RANK=$TRACKB_VLLM_MAX_LORA_RANK: expected a positive integer"
    args+=(--enable-lora --max-lora-rank "$TRACKB_VLLM_MAX_LORA_RANK")
fi
if [[ -n "${TRACKB_VLLM_ATTENTION_BACKEND:-}" ]]; then
    [[ "$TRACKB_VLLM_ATTENTION_BACKEND" =~ ^[A-Z0-9_]+$ ]] \
        || die "TRACKB_VLLM_ATTENTION_BACKEND=$TRACKB_VLLM_ATTENTION_BACKEND: expected a backend name such as TRITON_ATTN"
    args+=(--attention-backend "$TRACKB_VLLM_ATTENTION_BACKEND")
fi

# TRACKB_VLLM_DRY_RUN=1 prints the command instead of running it (used by the tests).
if [[ "${TRACKB_VLLM_DRY_RUN:-}" == 1 ]]; then
    printf '%q ' vllm serve "$model" "${args[@]}" "$@"
    echo
    exit 0
fi

# exec: vLLM becomes PID 1 and receives the pod's SIGTERM itself.
exec vllm serve "$model" "${args[@]}" "$@"
