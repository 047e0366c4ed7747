#!/usr/bin/env bash
# The README demo: prepares the built-in python-stdlib corpus (once), then trains the
# tiny model from scratch for real under DeepSpeed ZeRO-2: on every GPU present, or
# on 2 CPU ranks. Prints where the metrics, checkpoints and status are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
# shellcheck source=launcher/lib.sh
. launcher/lib.sh
albor_activate_venv
# Without a GPU, tell DeepSpeed so instead of letting it probe and warn on every import.
if ! albor_has_gpu; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

DATA="${ALBOR_DEMO_DATA:-data/python-stdlib}"
RUN="${ALBOR_DEMO_RUN:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
[ -f "$DATA/index.json" ] || albor prepare-data --builtin python-stdlib --output "$DATA"

if albor_has_gpu; then
  RANKS=$(nvidia-smi -L | wc -l)
else
  RANKS=2
fi
set +e
deepspeed --quiet --num_gpus "$RANKS" --module albor.pretrain \
  --config launcher/demo.yaml --dataset "$DATA" --output-dir "$RUN"
code=$?
set -e
echo
if [ "$code" -eq 0 ] || [ "$code" -eq 4 ]; then  # a finished run: look at it, take the model along
  albor report "$RUN"
  albor export --hf "$RUN-hf" "$RUN"
  echo
fi
echo "exit code $code (see README: 0 = target met)"
echo "metrics:     $RUN/metrics.jsonl"
echo "checkpoints: $RUN/ckpt/ (epoch-NNN.apr + epoch-NNN.metadata.json)"
echo "status:      $RUN/status.json"
if [ "$code" -eq 0 ] || [ "$code" -eq 4 ]; then
  echo "report:      $RUN/report.png"
  echo "transformers: AutoModelForCausalLM.from_pretrained('$RUN-hf')"
fi
exit "$code"
