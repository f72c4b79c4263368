#!/usr/bin/env bash
# The whole pipeline on a small synthetic dataset, in one folder:
#   data synth -> data check -> sample-inspect -> train -> eval-progress -> export -> predict
#
#   examples/quickstart.sh [WORK_DIR]          (default: ./quickstart; about 2 minutes on 2 CPU
#                                               cores, less on a GPU)
#
# Extra `alignprog train` flags go in ALIGNPROG_TRAIN_ARGS, e.g.
#   ALIGNPROG_TRAIN_ARGS="--method tcc --epochs 10" examples/quickstart.sh
# Every step overwrites what an earlier run of this script wrote in WORK_DIR.
set -euo pipefail

work="${1:-quickstart}"
mkdir -p "$work"
data="$work/data"

# 1. A dataset root: features/*.npy, dataset.json, splits.json, id2action.txt
alignprog data synth --out "$data" --tasks 2 --videos-per-task 12 --dim 256 --overwrite
alignprog data check --dataset "$data"

# 2. What the progress head will be taught: the sampled segments per progress bin
alignprog sample-inspect --dataset "$data" --json > "$work/sampling.json"

# 3. Train LAV and the progress head (the run folder is $work/runs/quickstart)
read -r -a extra <<< "${ALIGNPROG_TRAIN_ARGS:-}"      # flags split on spaces, never globbed
alignprog train --method lav --dataset "$data" --runs-dir "$work/runs" --name quickstart \
    --epochs 10 --overwrite --quiet ${extra[@]+"${extra[@]}"}

# 4. Progress error of the trained head against the baselines, and the alignment metrics
alignprog eval-progress "$work/runs/quickstart" --alignment --json > "$work/evaluation.json"

# 5. A self-contained export (safetensors + config + model card)
alignprog export "$work/runs/quickstart" --out "$work/export" --overwrite

# 6. Online progress of the first test video of each task, per action of its annotation
videos=()
while IFS= read -r path; do videos+=("$path"); done < <("${PYTHON:-python3}" -c '
import json, sys
splits = json.load(open(sys.argv[1]))["splits"]
for s in splits.values():
    if s["test"]:
        print(sys.argv[2] + "/" + s["test"][0] + ".npy")
' "$data/splits.json" "$data/features")
alignprog predict "$work/export" "${videos[@]}" --segments "$data/dataset.json" --json \
    > "$work/predict.json"
echo "quickstart: everything is in $work (evaluation.json, export/, predict.json)"
