#!/usr/bin/env bash
# Reruns every benchmark in benchmarks/ (each benchmarks/bench_*.py, as `python FILE` with its own
# defaults) and rewrites BENCHMARKS.md at the repository root: each one's ratios against the baseline it
# runs in the same process, its full output, the machine, the versions and the commit, when, and what is
# still only an estimate. A few CPU minutes on 2 cores, most of them bench_overhead.py:
#   bash benchmarks/run_all.sh
# A benchmark that fails is marked on the page, and the script then exits 1.
#
# Environment:
#   ALBOR_VENV      virtualenv to activate, relative to the repository (default: its .venv, when it
#                   exists; one named here must exist)
#   DS_ACCELERATOR  set to cpu here when no GPU is found, unless already set
set -euo pipefail
# shellcheck source=launcher/lib.sh
. "$(dirname "$0")/../launcher/lib.sh"
cd "$albor_root"
albor_activate_venv
gpu="none"
if albor_has_gpu; then
  gpu=$(nvidia-smi -L | sed 's/ (UUID.*//' | paste -sd ';' -)
else
  # Without this DeepSpeed probes for a GPU and warns at every import.
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
started=$(date -u '+%Y-%m-%d %H:%M UTC')
failed=0
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  echo "running python $bench ..." >&2
  t0=$(date +%s)
  code=0
  python "$bench" >"$logs/$name.out" 2>&1 || code=$?
  echo "$code $(($(date +%s) - t0))" >"$logs/$name.status"
  [ "$code" = 0 ] || failed=1
done

version() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "not installed"; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit, with uncommitted changes"

page() {
  cat <<EOF
# Benchmarks

Written by \`bash benchmarks/run_all.sh\` on $started; rerun it rather than edit this page. Each
benchmark times albor against a baseline in the same process, on the same machine at the same moment,
so its **ratios** are the figures to compare between machines and commits; absolute rates are this
machine's.

| | |
|---|---|
| machine | $(nproc) cores, $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) memory, GPU: $gpu |
| software | $(uname -sr), Python $(python -c 'import platform; print(platform.python_version())'), torch $(version torch), DeepSpeed $(version deepspeed), tokenizers $(version tokenizers), transformers $(version transformers) |
| commit | $commit |

EOF
  for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    read -r code seconds <"$logs/$name.status"
    echo "## $name.py"
    echo
    # The first line of its docstring says what it measures.
    echo "$(sed -n '1s/^"""//p' "$bench") Ran \`python $bench\` (its defaults): $seconds s, exit $code$([ "$code" = 0 ] || echo ' **(FAILED)**')."
    echo
    echo "Ratios (its section headings, ratio lines and closing summary):"
    echo
    echo '```'
    # The one convention every benchmark prints to: "== " section headings, "ratio x/y: ..." lines, and
    # a closing block from its "== summary" heading to the end.
    awk '/^== summary/ {summary = 1} summary || /^== |ratio [A-Za-z_]+\/[A-Za-z_]+:/' "$logs/$name.out"
    echo '```'
    echo
    echo '<details><summary>full output</summary>'
    echo
    echo '```'
    cat "$logs/$name.out"
    echo '```'
    echo
    echo '</details>'
    echo
  done
  cat <<'EOF'
## Still estimates

Nothing below has been measured: no GPU has run albor yet, and this script runs each benchmark with its
defaults, on the CPU where there is no GPU.

- **albor-370M on one GPU, micro-batch 16 x 1024, bf16.** Per token, 6N + 12·L·H·Q·T = 6 x 322.0M +
  12 x 24 x 1024 x 1024 ≈ 2.23 GFLOP, so 36.6 TFLOP a step. At 50% MFU of an H100's 989 TFLOP/s (bf16,
  dense) that is a 74 ms step, the target; as written before the chunked loss (no torch.compile, fp32 logits for
  the whole batch, vocabulary 50257 not padded to a multiple of 64) the estimate was 115-150 ms, 25-32% MFU. Memory: about
  5 GB of weights and optimizer state and 18 GB of activations, so no activation checkpointing on 80 GB.
- **albor's per-step overhead on a GPU.** bench_overhead.py measures it on CPU ranks over gloo. On a GPU
  the bare loop never waits for the device, while albor's step reads its one all-reduced buffer back
  (one host sync a step): its cost there is unmeasured.
- **Multi-node scaling, NCCL all-reduce time, checkpoint write time at 370M:** unmeasured.

`bash launcher/gpu_check.sh` on a machine with a GPU measures the first, at micro-batch 8: tokens/s,
MFU and GPU utilisation of a short albor-370M run, and bench_model.py on the GPU.
EOF
}

page >BENCHMARKS.md.tmp
mv BENCHMARKS.md.tmp BENCHMARKS.md
echo "wrote BENCHMARKS.md" >&2
exit "$failed"
