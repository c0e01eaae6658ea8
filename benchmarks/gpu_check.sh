#!/usr/bin/env bash
# Everything the GPU targets need, on one GPU + 16 cores, in under 8 minutes by its own clock:
#   1. speed.py fp32 and --amp for iidm.py and dacs.py (paper settings, 50 timed steps after 5): ms/iter,
#      floor, host issue time, TFLOP/s, max_memory_allocated and _reserved, host syncs; then --compile (inductor,
#      mode default) for both, fp32 and --amp: its start-up column holds the first iterations' compile;
#   2. the launch-bound probe: one IIDM student pass (fwd + bwd, bf16) at batch 1, 2, 4;
#   3. loader.py --together: all of a script's streams at once with its default --workers per stream, on the
#      original and a prepared root, delivered iterations/s against the step ms/iter measured in 1;
#   4. speed.py --amp for the other rows (peak memory against the 11 GB bar), then fp32, while time is left;
#   5. --amp --compile-mode reduce-overhead (CUDA graphs) for iidm.py and dacs.py, while time is left.
# A part starts only when enough time is left before LIMIT seconds and is cut at LIMIT; both are noted in
# the log. speed.py writes its tables after every record, so a cut part keeps the rows it finished.
# Tables and logs go to $OUT: RESULTS.md, speed.json, loader_together.json, probe.txt, log.txt. From the repo root:
#     OUT=gpu_out bash benchmarks/gpu_check.sh
# SMOKE=1 runs the same sequence on the CPU at --small sizes with one timed step (--compile rows with the
# aot_eager backend, mode default): a check of this script, not a measurement.
set -u
OUT=${OUT:-benchmarks/gpu_out}
LIMIT=${LIMIT:-470}                     # seconds on this script's clock (8 min = 480 s)
MACHINE=${MACHINE:-"1 GPU, 16 cores"}
mkdir -p "$OUT" || exit 2
P=$(command -v python || command -v python3)
DATA=${DATA:-$(mktemp -d)}
if [ "${SMOKE:-0}" = 1 ]; then
    DEV=cpu PRESET=small PROBE_SIZE=64
    S=(--device cpu --small --steps 1 --warmup 0 --threads 1 --workers 0)
    L=(--small --seconds 0.5)
    C=(--compile on --compile-backend aot_eager) CG=(--compile on --compile-backend aot_eager)
else
    DEV=cuda PRESET=paper PROBE_SIZE=512
    S=(--device cuda --steps 50 --warmup 5)
    L=(--seconds 4)
    C=(--compile on) CG=(--compile on --compile-mode reduce-overhead)
fi
# speed.py records the commit; a bare machine may have no git
command -v git >/dev/null || { G=$(mktemp -d); printf '#!/bin/sh\n' >"$G/git"; chmod +x "$G/git"; PATH=$G:$PATH; }
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "gpu_check.sh $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEV, limit $LIMIT s, out $OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
"$P" -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
"$P" -c "import sys; sys.path.insert(0, 'benchmarks'); import speed; speed.write_bench_data('$DATA', '$PRESET')" \
    || { echo "error: the benchmark data could not be written under $DATA"; exit 2; }
echo "data: t=$SECONDS s"

# part NAME NEED KILL COMMAND...: started only when NEED seconds are left before LIMIT; killed after KILL
# seconds or at LIMIT, whichever comes first
part() {
    local name=$1 need=$2 kill=$3
    shift 3
    local left=$((LIMIT - SECONDS))
    if [ "$left" -lt "$need" ]; then
        echo "SKIPPED at t=$SECONDS s ($left s left, needs $need s): $name"
        return
    fi
    [ "$kill" -gt "$left" ] && kill=$left
    echo "== $name (at most $kill s) at t=$SECONDS s"
    timeout -k 5 "$kill" "$@"
    local rc=$?
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "CUT after $kill s: $name"
    elif [ $rc != 0 ]; then
        echo "exit $rc: $name"
    fi
    echo "   t=$SECONDS s"
}
SPEED=("$P" benchmarks/speed.py "${S[@]}" --data-root "$DATA" --json "$OUT/speed.json" --results "$OUT/RESULTS.md"
       --machine "$MACHINE")

part "speed iidm.py fp32 + amp" 60 150 "${SPEED[@]}" --amp both --scripts iidm.py
part "speed dacs.py fp32 + amp" 60 150 "${SPEED[@]}" --amp both --scripts dacs.py
part "speed iidm.py, dacs.py --compile" 120 200 "${SPEED[@]}" --amp both "${C[@]}" --scripts iidm.py dacs.py

# The launch-bound probe: a step is launch-bound when ms barely grows with the batch and the host's issue
# time is close to ms.
cat >"$OUT/probe.py" <<'EOF'
import sys, time, torch
sys.path.insert(0, ".")
import common, training
from torch.utils.flop_counter import FlopCounterMode
dev, size = training.select_device(sys.argv[1]), int(sys.argv[2])
cuda = dev.type == "cuda"
amp = training.Amp(dev, True)
build = lambda: common.DeepLabV2(19, style="pytorch", freeze_bn_affine=False)  # IIDM's student
with torch.device("meta"), FlopCounterMode(display=False) as fc:               # FLOP of fwd + bwd, one image
    build()(torch.randn(1, 3, size, size)).float().mean().backward()
flop = fc.get_total_flops()
m = training.prepare_model(build(), dev, amp).train()
out = open(sys.argv[3], "w")
def report(line):
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()
report(f"IIDM student, bf16 autocast + channels_last, {size}x{size}, {flop / 1e9:.1f} GFLOP fwd+bwd per image")
for b in (1, 2, 4):
    x, ts = torch.randn(b, 3, size, size, device=dev), []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for k in range(13):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp.autocast():
            loss = m(x).float().mean()
        loss.backward()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0, t1 - t0))
    t, h = sorted(ts[3:])[5]
    mem = (f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB allocated, "
           f"{torch.cuda.max_memory_reserved() / 2 ** 30:.2f} GiB reserved") if cuda else "no CUDA memory"
    report(f"fwd+bwd batch {b}: {1e3 * t:.1f} ms, host issue {1e3 * h:.1f} ms, "
           f"{flop * b / t / 1e12:.2f} TFLOP/s, {mem}")
EOF
part "launch-bound probe" 30 60 "$P" "$OUT/probe.py" "$DEV" "$PROBE_SIZE" "$OUT/probe.txt"

"$P" -c 'import torchvision' 2>/dev/null && LS=(dacs.py iidm.py) || LS=(classmix_ssl.py)   # SYNTHIA labels need it
part "loader.py --together --prepared (default workers per stream)" 60 150 "$P" benchmarks/loader.py "${L[@]}" \
    --data-root "$DATA" --together --prepared --sources gta5 --scripts "${LS[@]}" --speed-json "$OUT/speed.json" \
    --json "$OUT/loader_together.json" --results "$OUT/RESULTS.md" --machine "$MACHINE"

for row in classmix_ssl.py "camix.py phase B (CAMix)" asss.py "dldm.py student" "dldm.py M_SL" "dldm.py M_RL" \
           "camix.py phase A (DACS warm-up)"; do
    part "speed $row --amp" 40 90 "${SPEED[@]}" --amp on --scripts "$row"
done
for row in classmix_ssl.py "camix.py phase B (CAMix)" asss.py "dldm.py student"; do
    part "speed $row fp32" 50 120 "${SPEED[@]}" --amp off --scripts "$row"
done
part "speed iidm.py, dacs.py --amp --compile reduce-overhead" 100 150 "${SPEED[@]}" --amp on "${CG[@]}" \
    --scripts iidm.py dacs.py
echo "done at t=$SECONDS s; tables: $OUT/RESULTS.md, $OUT/speed.json, $OUT/loader_together.json, $OUT/probe.txt"
