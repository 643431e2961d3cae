# Sourced by the sbatch scripts: environment, and a snapshot of what is being run.
# Usage: source slurm/common.sh <the train.py overrides>
PYTHON=${MOSHI_TTT_PYTHON:-$(make -s -C "$REPO_DIR" print-python 2>/dev/null || echo python)}
export NO_TORCH_COMPILE=${NO_TORCH_COMPILE:-0}
export PYTHONUNBUFFERED=1
export MOSHI_TTT_OUTPUT=${MOSHI_TTT_OUTPUT:-$REPO_DIR/outputs}
mkdir -p slurm-logs

# The run directory comes from run_name: snapshot the code revision and the resolved config
# there (once per attempt, so a requeue records what it resumed with).
RUN_NAME=$(printf '%s\n' "$@" | sed -n 's/^run_name=//p' | tail -n 1)
RUN_NAME=${RUN_NAME:-default}
RUN_DIR="$MOSHI_TTT_OUTPUT/runs/$RUN_NAME"
ATTEMPT_DIR="$RUN_DIR/attempts/${SLURM_JOB_ID:-local}-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$ATTEMPT_DIR"
git -C "$REPO_DIR" rev-parse HEAD > "$ATTEMPT_DIR/git_revision.txt" 2>/dev/null || echo "not a git checkout" > "$ATTEMPT_DIR/git_revision.txt"
git -C "$REPO_DIR" diff > "$ATTEMPT_DIR/git_diff.patch" 2>/dev/null || true
printf '%s\n' "$@" > "$ATTEMPT_DIR/overrides.txt"
"$PYTHON" train.py "$@" --cfg job --resolve > "$ATTEMPT_DIR/config_resolved.yaml"
env | grep -E '^(SLURM_|CUDA_VISIBLE_DEVICES|NCCL_)' | sort > "$ATTEMPT_DIR/env.txt" || true
echo "moshi-ttt: run $RUN_NAME, attempt $(basename "$ATTEMPT_DIR"), restart count ${SLURM_RESTART_COUNT:-0}"
