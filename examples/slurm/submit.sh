#!/usr/bin/env bash
# Submit a dataset-wide mean Fisher as a Slurm job array of N tasks plus a dependent merge job;
# prints the two job ids. Extra arguments go to both sbatch calls (partition, time, CPUs, …).
#
#   FS_MODEL=/models/SmolLM2 FS_INPUT=docs.txt FS_LAYERS=10,20 FS_OUT=/scratch/fisher \
#     FS_BIN=$PWD/target/release/fisher-stein examples/slurm/submit.sh 8 --partition=gpu
#
# Output: $FS_OUT/shard-<i>/ per task (mean.safetensors, metadata.json, run.json), their logs in
# $FS_OUT/logs/task-<i>.log (appended across requeues), and the merged mean in $FS_OUT/mean/.
set -euo pipefail
n=${1:?usage: submit.sh N_TASKS [sbatch options...]}
shift
: "${FS_MODEL:?set FS_MODEL}" "${FS_INPUT:?set FS_INPUT}" "${FS_LAYERS:?set FS_LAYERS}" "${FS_OUT:?set FS_OUT}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$FS_OUT/logs"
export FS_MODEL FS_INPUT FS_LAYERS FS_OUT
array=$(sbatch --parsable --array="0-$((n - 1))" --output="$FS_OUT/logs/task-%a.log" "$@" \
  "$here/fisher-array.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes \
  --output="$FS_OUT/logs/merge.log" "$@" "$here/fisher-merge.sbatch")
merge=${merge%%;*}
echo "array $array"
echo "merge $merge"
