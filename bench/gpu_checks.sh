#!/usr/bin/env bash
# Everything the GPU path needs checked, in one run on a CUDA machine (the `gpu` or `hopper` extra installed;
# the demo shards in data/demo): the GPU tests, the small-preset benchmark of bench/RESULTS.md, and
# the training loop on the same preset against the benchmark's raw step (issue: >= 90%).
# Logs, the benchmark's JSON and the loop's metrics.jsonl go to $OUT (or the current folder).
# The first run on a fresh machine spends 2-4 minutes compiling and autotuning fla's Triton kernels.
# VARLEN=0 runs the packed benchmark and the loop on masked SDPA instead of varlen flash attention
# (model/ops/attention.py).
# Stages can be picked: `bash bench/gpu_checks.sh tests bench bench-packed loop` (default: those four);
# `bench-ep` and `loop-ep` (2 GPUs) compare expert parallelism with data parallelism on conf=small,
# as the raw step (launch/bench.py layout) and as the training loop; `start-80b` measures the start-up
# and peak memory at the 80B width on one GPU (EXPERTS="384 256" picks the expert counts); `slice`
# times the step at the 80B's layer width (4 layers + MTP, 128 experts) with its op-family table,
# `slice-peak` lists what holds memory at its peak (allocation history: failed on the slice),
# `slice-phases` the allocator's peak between the step's phases (layers, heads, gradients handed over);
# `attention` times the attention kernels torch ships at the 80B's attention shape.
set -uo pipefail
out=${OUT:-.}
export TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
stages=${*:-tests bench bench-packed loop}
stamp() { echo "== $1 $(date +%T)"; }
for stage in $stages; do
    stamp "$stage"
    case $stage in
    tests)
        # TEST_ARGS picks tests, e.g. TEST_ARGS='-k "not compiled"' (pytest options)
        eval timeout "${TEST_TIMEOUT:-300}" python -m pytest tests/gpu -q -rfE --tb=short -p no:cacheprovider --durations=15 \
            "${TEST_ARGS:-}" > "$out/gpu_tests.log" 2>&1
        tail -45 "$out/gpu_tests.log" ;;
    bench)
        python launch/bench.py model --preset small --steps 6 --warmup 3 \
            --variants ${BENCH_VARIANTS:-ours ours-compiled ours-compiled+mtp hf} --out "$out/bench.json" \
            > "$out/bench.log" 2>&1
        tail -8 "$out/bench.log" ;;
    bench-packed)
        # the same step on rows of 8 packed documents each, as the training loop sees real data
        QWEN3NEXT_VARLEN=${VARLEN:-1} python launch/bench.py model --preset small --steps 6 --warmup 3 --documents 8 \
            --variants ${BENCH_VARIANTS:-ours-compiled+mtp} --out "$out/bench_packed_varlen${VARLEN:-1}.json" \
            > "$out/bench_packed_varlen${VARLEN:-1}.log" 2>&1
        tail -4 "$out/bench_packed_varlen${VARLEN:-1}.log" ;;
    loop)
        # conf=small as shipped (4 x 4096 micro-batches, 4 per optimizer step, MTP on), on the demo
        # shards (29 of them: fewer streams than the preset's 64)
        rm -rf /tmp/loop-small
        python launch/pretrain.py conf=small data.streams=16 trainer.max_steps=${LOOP_STEPS:-12} \
            trainer.varlen_attention=$([ "${VARLEN:-1}" = 0 ] && echo false || echo true) \
            trainer.profile_step=${PROFILE_STEP:-0} \
            run.dir=/tmp/loop-small logging.wandb.mode=disabled checkpoint.every=0 > "$out/loop.log" 2>&1
        cp /tmp/loop-small/metrics.jsonl "$out/loop_metrics.jsonl"
        cp /tmp/loop-small/profile/operators.txt "$out/loop_operators.txt" 2>/dev/null
        [ -f /tmp/loop-small/profile/trace.json ] && gzip -c /tmp/loop-small/profile/trace.json > "$out/loop_trace.json.gz"
        tail -6 "$out/loop.log" ;;
    slice)
        # the 80B-A3B's layer width on one GPU (launch/bench.py layout --preset 80b_a3b-slice), with the
        # per-op-family table of a profiled step and where the GPU waited for the host (bench/host_gaps.py);
        # SLICE_ARGS adds options or overrides, SLICE_TAG names the outputs
        python launch/bench.py layout --preset 80b_a3b-slice --steps ${SLICE_STEPS:-6} --warmup 3 \
            --out "$out/slice${SLICE_TAG:-}.json" --trace "$out/slice${SLICE_TAG:-}_trace.json.gz" ${SLICE_ARGS:-} \
            > "$out/slice${SLICE_TAG:-}.log" 2>&1
        grep -v "^ *\(W\|I\)[0-9]" "$out/slice${SLICE_TAG:-}.log" | tail -${SLICE_TAIL:-50} ;;
    slice-peak)
        # what holds GPU memory at the slice's peak, by the source line that allocated it (bench/memory_peak.py)
        python -m bench.memory_peak --preset 80b_a3b-slice --steps 1 --warmup 1 \
            --out "$out/slice_peak${SLICE_TAG:-}.json" ${SLICE_ARGS:-} > "$out/slice_peak${SLICE_TAG:-}.log" 2>&1
        grep -v "^ *\(W\|I\)[0-9]" "$out/slice_peak${SLICE_TAG:-}.log" | tail -60 ;;
    slice-phases)
        # where in the slice's step the memory peaks: the allocator's peak between marks at each layer's
        # forward and backward, the heads and each gradient handed over (bench/memory_phases.py; fla's
        # kernels on one autotuning configuration each, so a fresh machine compiles for about a minute)
        python -m bench.memory_phases --preset 80b_a3b-slice --steps 1 --warmup 2 ${SLICE_ARGS:-} \
            > "$out/slice_phases${SLICE_TAG:-}.log" 2>&1
        grep -A8 "^the highest" "$out/slice_phases${SLICE_TAG:-}.log" || tail -30 "$out/slice_phases${SLICE_TAG:-}.log" ;;
    attention)
        # the gated attention's shape (16 query heads, 2 KV heads, head dim 256, 8192 tokens): torch's
        # varlen flash (the model's path), SDPA's backends and flex attention, against the fp32 reference
        python bench/attention_kernels.py --out "$out/attention.jsonl" > "$out/attention.log" 2>&1
        grep -v Warning "$out/attention.log" | tail -12 ;;
    bench-ep)
        # 2 GPUs (nvidia-h100-x2): the raw step of conf=small with experts over both GPUs (ep2) against
        # plain data parallel (ep1 x dp2), and the all-to-all time per MoE layer (issue 5)
        # LAYOUT_ARGS passes more options (e.g. --no-compile), EP_TIMEOUT bounds each run (seconds)
        for ep in ${EP_SIZES:-1 2}; do
            timeout "${EP_TIMEOUT:-600}" torchrun --nproc-per-node 2 launch/bench.py layout --preset small \
                --expert $ep --steps 6 --warmup 3 ${LAYOUT_ARGS:-} --out "$out/bench_ep$ep.json" \
                > "$out/bench_ep$ep.log" 2>&1
            grep "^layout" "$out/bench_ep$ep.log" || tail -5 "$out/bench_ep$ep.log"
        done ;;
    loop-ep)
        # 2 GPUs (nvidia-h100-x2): conf=small with experts over both (ep2) against plain data parallel
        # (ep1 x dp2), same global batch; the profile of step 8 times the all-to-alls
        for ep in 1 2; do
            rm -rf /tmp/loop-ep$ep
            torchrun --nproc-per-node 2 launch/pretrain.py conf=small \
                trainer.varlen_attention=$([ "${VARLEN:-1}" = 0 ] && echo false || echo true) \
                data.streams=16 trainer.max_steps=${LOOP_STEPS:-12} parallel.expert=$ep \
                trainer.profile_step=8 run.dir=/tmp/loop-ep$ep logging.wandb.mode=disabled \
                checkpoint.every=0 > "$out/loop_ep$ep.log" 2>&1
            cp /tmp/loop-ep$ep/metrics.jsonl "$out/loop_ep${ep}_metrics.jsonl"
            cp /tmp/loop-ep$ep/profile/operators.txt "$out/loop_ep${ep}_operators.txt" 2>/dev/null
            tail -3 "$out/loop_ep$ep.log"
        done ;;
    start-80b)
        # one GPU at the 80B-A3B layer width (hidden 2048, 16/32 DeltaNet heads, experts of width 512,
        # top-10): 4 layers + MTP with EXPERTS of the 512 experts, the preset's activation
        # checkpointing; reports the start-up (model built on the meta device, this rank's shard
        # materialised and initialised, then the engine) and the peak GPU memory against the dry
        # run's estimate for the same config
        for experts in ${EXPERTS:-384}; do
            timeout "${START_TIMEOUT:-600}" python launch/bench.py layout --preset 80b_a3b --steps 3 --warmup 2 \
                --out "$out/start_80b_e$experts.json" model.num_hidden_layers=4 model.num_experts=$experts \
                > "$out/start_80b_e$experts.log" 2>&1
            grep -E "^layout|^start-up" "$out/start_80b_e$experts.log" || tail -20 "$out/start_80b_e$experts.log"
        done ;;
    esac
done
stamp done
