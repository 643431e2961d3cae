#!/usr/bin/env bash
# The GPU check on a lent machine that reaches no network, in one call of the device tool's `run`:
#
#     command: bash bench/gpu_check_device.sh        carry: [".gpu-wheels"]        timeout_s: 600
#
# 1. a venv over the image's python3 (torch 2.11, numpy 2.5, lightning, ... stay the image's),
#    into which what the image lacks is installed from .gpu-wheels (`make gpu-wheels`, here) with
#    `pip install --no-index --no-deps` (moshi over the image's torch; DeepSpeed built from its sdist
#    with --no-build-isolation and no op prebuilt, DS_BUILD_OPS=0); the project itself is on
#    PYTHONPATH (src/), not installed; the install is timed;
# 2. bench/gpu_check.py --budget-s (480, cut to what the call has left after the install), which
#    writes gpu_check.json and gpu_check.md; they are copied to $OUT with gpu_check.log, which
#    holds this script's whole output, then the tail of every worker's and train.py run's log.
# Arguments go to bench/gpu_check.py (e.g. --parts 0 1 2, or --dry-run for a CPU rehearsal).
# Environment: BASE_PYTHON (python3), GPU_WHEELS (.gpu-wheels), GPU_VENV (/tmp/moshi-ttt-gpu-venv,
# made anew), OUT (outputs/gpu_check_device), GPU_CHECK_BUDGET_S (480), GPU_CHECK_CALL_S (570: the
# whole script, under the device tool's 600 s a command), GPU_CHECK_WORK (outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s.%N)
BASE_PYTHON=${BASE_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
VENV=${GPU_VENV:-/tmp/moshi-ttt-gpu-venv}
OUT=${OUT:-outputs/gpu_check_device}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
CALL_S=${GPU_CHECK_CALL_S:-570}
WORK=${GPU_CHECK_WORK:-outputs/gpu_check}
LIST=bench/gpu_wheels.txt
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/logs" "$WORK"/part[0-9]*  # an earlier run's, on a machine kept warm
LOG=$OUT/gpu_check.log
: >"$LOG"
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1  # the console (what the device tool shows) and the log
TEE=$!

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "gpu_check_device: $*"; }

say "$(date -u +%FT%TZ) on $(hostname); base $(command -v "$BASE_PYTHON"); wheels $WHEELS; venv $VENV"
if ! [ -d "$WHEELS" ] || [ -z "$(ls -A "$WHEELS" 2>/dev/null)" ]; then
  say "no wheelhouse at $WHEELS: run \`make gpu-wheels\` here and carry .gpu-wheels in the device call"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu_check_device: GPU /'

# --- 1. install ---------------------------------------------------------------------------------
T0=$(date +%s.%N)
rm -rf "$VENV"
# --without-pip: no ensurepip needed; pip comes from the image's site-packages (below).
"$BASE_PYTHON" -m venv --system-site-packages --without-pip "$VENV" || { say "venv failed"; exit 2; }
# The image's python3 is itself a venv (/opt/torch/.venv): a venv made from it sees the base
# interpreter's site-packages, not the image venv's, through --system-site-packages. This .pth adds
# the image's own site-packages (with their .pth files) right after the new venv's, so torch and
# co. are the image's, and what is installed here wins.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$BASE_PYTHON" - "$SITE/_moshi_ttt_image_site.pth" <<'EOF'
import site, sys
dirs = site.getsitepackages()
with open(sys.argv[1], "w") as f:
    f.writelines(f"import site; site.addsitedir({d!r})\n" for d in dirs)
print("gpu_check_device: image site-packages seen from the venv:", ", ".join(dirs))
EOF
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input --no-cache-dir)
# bench/gpu_wheels.txt: "# sdist" lines are built here, "# floor" lines only replace an older one
REQS=$(mktemp -d)
sed '/^[[:space:]]*#/d; /^[[:space:]]*$/d; s/[[:space:]]*#[[:space:]]*floor.*$/ FLOOR/; s/[[:space:]]*#.*$//' "$LIST" >"$REQS/all"
grep -v ' FLOOR$' "$REQS/all" >"$REQS/pinned"
grep ' FLOOR$' "$REQS/all" | sed 's/ FLOOR$//; s/==/>=/' >"$REQS/floors" || true
say "installing $(wc -l <"$REQS/pinned") pinned distributions and $(wc -l <"$REQS/floors") floors from $WHEELS"
export DS_BUILD_OPS=0  # DeepSpeed: no op compiled at install; ops JIT-compile on first use, if ever
if [ -s "$REQS/floors" ]; then  # satisfied by the image when it can be (then nothing is installed)
  "${PIP[@]}" install -q --no-index --find-links "$WHEELS" -r "$REQS/floors" || say "floors: pip failed"
fi
"${PIP[@]}" install --no-index --no-deps --no-build-isolation --find-links "$WHEELS" -r "$REQS/pinned" 2>&1 \
  | grep -vE '^(Looking in links|Processing |  Preparing metadata|  Building wheel|  Created wheel|  Stored in|Building wheels)'
PIP_RC=${PIPESTATUS[0]}
INSTALL_S=$(since "$T0")
say "install took ${INSTALL_S} s (pip exit $PIP_RC)"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" NO_TORCH_COMPILE=1
"$VENV/bin/python" - <<'EOF'
import importlib, time
for name in ("torch", "numpy", "moshi", "hydra", "omegaconf", "lightning", "deepspeed", "webdataset", "fla", "moshi_ttt"):
    t = time.perf_counter()
    try:
        m = importlib.import_module(name)
        where = getattr(m, "__file__", "?")
        print(f"gpu_check_device: import {name} {getattr(m, '__version__', '')} ({time.perf_counter() - t:.1f} s) {where}")
    except Exception as e:  # the table's first row reports it too
        print(f"gpu_check_device: import {name} FAILED: {type(e).__name__}: {e}")
EOF
say "pip check (moshi's pins on torch/numpy and its serving extras are expected here):"
"${PIP[@]}" check 2>&1 | sed 's/^/  /' | head -40

# --- 2. the check -------------------------------------------------------------------------------
LEFT=$(awk -v call="$CALL_S" -v used="$(since "$START")" 'BEGIN { printf "%d", call - used - 20 }')
BUDGET=$((LEFT < BUDGET_S ? LEFT : BUDGET_S))
say "gpu_check.py --budget-s $BUDGET (of $BUDGET_S; ${CALL_S} s for the whole call, $(since "$START") s used)"
T1=$(date +%s.%N)
# the check ends its parts at the budget; the timeout only guards the copy below
timeout -k 10 $((BUDGET + 40)) "$VENV/bin/python" bench/gpu_check.py --budget-s "$BUDGET" --out "$WORK" \
  --install-s "$INSTALL_S" "$@"
RC=$?
say "gpu_check.py exit $RC after $(since "$T1") s; install ${INSTALL_S} s; whole call $(since "$START") s"
cp -f "$WORK/gpu_check.json" "$WORK/gpu_check.md" "$OUT/" 2>/dev/null || say "no gpu_check.json/.md (see above)"

# --- 3. the workers' logs, at the end of the one log file ----------------------------------------
exec 1>&3 2>&4 3>&- 4>&-  # the console's tail keeps the table
wait "$TEE" 2>/dev/null
for f in "$WORK"/logs/*.log "$WORK"/part*/*/*.log; do
  [ -f "$f" ] || continue
  echo "===== $f (last 64 KiB)"
  tail -c 65536 "$f"
done >>"$LOG"
rm -rf "$REQS"
exit $RC
