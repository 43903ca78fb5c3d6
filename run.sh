#!/usr/bin/env bash
# The whole pipeline on the built-in task, on CPU: set-up (a virtual environment, first time only), then
# data generation, SFT -> reward model -> PPO, and the report (out/report.md). Extra flags go to every stage,
# e.g. `bash run.sh --device=cpu --threads=2`.
set -euo pipefail
cd "$(dirname "$0")"
DEV=${DEV:-0} source ./setup.sh
# matplotlib is optional (plots in the report); try to install it, carry on without it
python -c "import matplotlib" 2>/dev/null || python -m pip install -q matplotlib 2>/dev/null || \
  echo "(matplotlib could not be installed: the report will have no plots)"
t0=$(date +%s)
# --overwrite=1: the demo starts over in out/ each time it runs (--resume=1 among the extra flags continues instead)
echo "== stage 1/3: supervised fine-tuning"; python train_sft.py --overwrite=1 "$@"
echo "== stage 2/3: reward model";           python train_rm.py --overwrite=1 "$@"
echo "== stage 3/3: PPO";                    python train_ppo.py --overwrite=1 "$@"
python report.py
echo "== done in $(( $(date +%s) - t0 )) s; report in out/report.md"
