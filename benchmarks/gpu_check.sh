#!/usr/bin/env bash
# GPU check: the --device cuda paths (train, finetune with IBP, prune, export with onnxruntime's CUDA
# provider, certify, VNN-LIB) on a machine that has CUDA and torch but no package registry, with a
# short GPU-vs-CPU timing of certification and IBP training. Sized to finish in under 5 minutes.
#
#   make wheels                                   # here, with the registry: fills .whl/
#   bash benchmarks/gpu_check.sh                  # there: installs .whl/ into a scratch folder, runs the checks
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # the same steps on the CPU at a tiny size (no GPU needed)
#   bash benchmarks/gpu_check.sh --download-wheels DIR   # what `make wheels` runs
#
# Without a GPU (and without --cpu-dry-run) it stops with one line saying so, exit code 2.
# Writes gpu_check.json (and the table, gpu_check.md) to $OUT when set, else to benchmarks/results/.
# PYTHON names the interpreter that has torch (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WHEELS=.whl
DRY_RUN=0
DOWNLOAD=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY_RUN=1 ;;
        --wheels) WHEELS=$2; shift ;;
        --download-wheels) DOWNLOAD=$2; shift ;;
        *) echo "error: unknown option $1 -- use --cpu-dry-run, --wheels DIR or --download-wheels DIR" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "$DOWNLOAD" ]; then
    # The pure-Python dependencies (and small binary ones) of harden[test] at the versions installed
    # here, auto-LiRPA, this package as a wheel, and a small MNIST file. torch, numpy, onnx,
    # onnxruntime and matplotlib stay out: too large to carry, and a CUDA machine has its own.
    mkdir -p "$DOWNLOAD"
    "$PY" - "$DOWNLOAD" <<'EOF'
import sys
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LARGE = {"torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "matplotlib", "contourpy", "kiwisolver",
         "fonttools", "pillow", "ml-dtypes", "protobuf", "sympy", "mpmath", "networkx", "triton"}
# auto-LiRPA's own metadata names stale pins (torch<1.13, ninja...): it is installed --no-deps, and
# its real needs are among harden's dependencies.
wanted, todo = {"auto-lirpa": distribution("auto-LiRPA").version}, [Requirement("harden[test]")]
while todo:
    requirement = todo.pop()
    name = canonicalize_name(requirement.name)
    if name in wanted or name in LARGE or name.startswith("nvidia-"):
        continue
    wanted[name] = distribution(requirement.name).version
    for text in distribution(requirement.name).requires or []:
        needed = Requirement(text)
        if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in requirement.extras or {""}):
            todo.append(needed)
del wanted["harden"]  # built from this checkout below
Path(sys.argv[1], "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(wanted.items())))
EOF
    "$PY" -m pip download -q --no-deps -d "$DOWNLOAD" -r "$DOWNLOAD/requirements.txt"
    # Built from a copy, so that the build leaves nothing in the working tree.
    SOURCE=$(mktemp -d)
    cp -r pyproject.toml README.md harden certify "$SOURCE"/
    "$PY" -m pip wheel -q --no-deps -w "$DOWNLOAD" "$SOURCE"
    rm -rf "$SOURCE"
    "$PY" - "$DOWNLOAD" <<'EOF'
import sys
import numpy as np
from certify.data.datasets import load_dataset
train = load_dataset("mnist", split="train")
# One file serves as both splits (files are read whole): the check times and compares, it does not score.
x, y = train.x[:7000].numpy()[:, 0], train.y[:7000].numpy()
np.savez_compressed(f"{sys.argv[1]}/mnist-7k.npz", x=(x * 255).round().astype(np.uint8), y=y)
EOF
    du -sh "$DOWNLOAD"
    exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$WORK/site/bin:$PATH"
fi
missing=$("$PY" -c "
import importlib.util
print(' '.join(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime', 'auto_LiRPA', 'harden', 'typer', 'rich', 'safetensors')
               if importlib.util.find_spec(m) is None))")
if [ -n "$missing" ]; then
    echo "error: $PY cannot import: $missing -- install them, or run \`make wheels\` where the registry is reachable and carry .whl/" >&2
    exit 2
fi
DEVICE=cuda
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "$DRY_RUN" = 0 ]; then
        echo "error: no GPU: torch.cuda.is_available() is False on this machine -- run it where CUDA works, or give --cpu-dry-run" >&2
        exit 2
    fi
    DEVICE=cpu
fi
COMPARED=$DEVICE  # the steps timed on both devices: only the CPU in a dry run
if [ "$DEVICE" = cuda ]; then COMPARED="cuda cpu"; fi
DATA=mnist
if [ -f "$WHEELS/mnist-7k.npz" ]; then DATA="$WHEELS/mnist-7k.npz"; fi
# The dry run only shows that every step runs, at a tiny size.
if [ "$DRY_RUN" = 1 ]; then TRAIN=600; CERT=8; else TRAIN=6000; CERT=200; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

STEPS="$WORK/steps.tsv"
: > "$STEPS"
STEP_LIMIT=${STEP_LIMIT:-150}  # seconds per step, so that one slow step cannot take the whole budget
step() {  # step NAME COMMAND...: run it, time it, keep its last lines; a failure is recorded, not fatal
    local name=$1; shift
    local start status=ok code=0
    start=$(date +%s.%N)
    timeout "$STEP_LIMIT" "$@" > "$WORK/$name.log" 2>&1 || code=$?
    if [ "$code" = 124 ]; then status=timeout; elif [ "$code" != 0 ]; then status=failed; fi
    [ "$status" = ok ] || tail -5 "$WORK/$name.log" >&2
    printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$(date +%s.%N)" "$status" >> "$STEPS"
    echo "$name: $status"
}
H=("$PY" -m harden)
C=("$PY" -m certify)
M=$WORK/m
step train "${H[@]}" train --data "$DATA" --arch small-cnn --epochs 1 --device "$DEVICE" --quiet -o "$M.safetensors"
step convert "${H[@]}" convert "$M.safetensors" -o "$M.hard.safetensors"
for dev in $COMPARED; do
    step "finetune_ibp_$dev" "${H[@]}" finetune "$M.hard.safetensors" --data "$DATA" --train ibp --eps 0.1 --epochs 1 \
        --limit "$TRAIN" --eval-limit "$CERT" --device "$dev" --quiet -o "$M.ibp.$dev.safetensors"
done
step prune "${H[@]}" prune "$M.ibp.$DEVICE.safetensors" --data "$DATA" --sparsity 0.5 --train pgd --eps 0.1 --steps 3 \
    --epochs 1 --limit "$TRAIN" --eval-limit "$CERT" --device "$DEVICE" --quiet -o "$M.pruned.safetensors"
step export "${H[@]}" export "$M.ibp.$DEVICE.safetensors" -o "$M.onnx"
for dev in $COMPARED; do
    step "certify_$dev" "${C[@]}" "$M.onnx" --data "$DATA" --eps 0.1 --limit "$CERT" --device "$dev" --quiet \
        --json "$WORK/certify_$dev.json"
done
"$PY" - "$M.onnx" "$WORK/prop.vnnlib" "$DATA" <<'EOF'
import sys
from certify.data.datasets import load_dataset
x, y = (lambda d: (d.x[0].flatten().tolist(), int(d.y[0])))(load_dataset(sys.argv[3], split="test"))
lines = [f"(declare-const X_{i} Real)" for i in range(len(x))] + [f"(declare-const Y_{j} Real)" for j in range(10)]
for i, v in enumerate(x):
    lines += [f"(assert (>= X_{i} {max(0.0, v - 0.02):.6f}))", f"(assert (<= X_{i} {min(1.0, v + 0.02):.6f}))"]
lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{y}))" for j in range(10) if j != y) + "))")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
EOF
for dev in $COMPARED; do
    step "vnnlib_$dev" "${C[@]}" "$M.onnx" --vnnlib "$WORK/prop.vnnlib" --device "$dev" --quiet --json "$WORK/vnnlib_$dev.json"
done
step onnxruntime_cuda "$PY" - "$M.onnx" <<'EOF'
import sys
import numpy as np
import onnxruntime as ort
providers = ort.get_available_providers()
print("providers:", providers)
if "CUDAExecutionProvider" not in providers:
    print("no CUDA provider in this onnxruntime (the plain CPU build): nothing to compare")
    sys.exit(0)
x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
cpu = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
gpu = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider"]).run(None, {"input": x})[0]
assert np.abs(cpu - gpu).max() <= 1e-3 + 1e-3 * np.abs(cpu).max(), np.abs(cpu - gpu).max()
print("CUDA provider agrees with the CPU provider, max |diff|", float(np.abs(cpu - gpu).max()))
EOF

RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
"$PY" - "$STEPS" "$WORK" "$DEVICE" "$DRY_RUN" "$RESULTS" "$TRAIN" "$CERT" <<'EOF'
import json, os, platform, sys
from pathlib import Path
import torch
steps_file, work, device, dry_run, results, train, cert = sys.argv[1:]
steps = []
for line in Path(steps_file).read_text().splitlines():
    name, start, end, status = line.split("\t")
    steps.append({"step": name, "seconds": round(float(end) - float(start), 1), "status": status})
def summary(name):
    path = Path(work, name)
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if "results" in doc:
        return [{k: r[k] for k in ("eps", "clean_accuracy", "certified_accuracy", "verified", "falsified", "unknown")} for r in doc["results"]]
    return {k: doc["summary"][k] for k in ("unsat", "sat", "unknown")}
verdicts = {name: summary(f"{name}.json") for name in (f"certify_{device}", "certify_cpu", f"vnnlib_{device}", "vnnlib_cpu")}
def agree(kind):
    a, b = verdicts.get(f"{kind}_{device}"), verdicts.get(f"{kind}_cpu")
    return None if device == "cpu" or a is None or b is None else a == b
seconds = {s["step"]: s["seconds"] for s in steps}
document = {
    "schema": "harden.gpu_check/1", "device": device, "dry_run": dry_run == "1",
    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "torch": torch.__version__,
    "python": platform.python_version(), "train_samples": int(train), "certify_samples": int(cert),
    "steps": steps, "verdicts": verdicts,
    "gpu_matches_cpu": {"certify": agree("certify"), "vnnlib": agree("vnnlib")},
    "speedup": None if device == "cpu" else {k: round(seconds[f"{k}_cpu"] / max(seconds[f"{k}_cuda"], 1e-9), 2)
                                            for k in ("finetune_ibp", "certify") if f"{k}_cpu" in seconds},
    "all_ok": all(s["status"] == "ok" for s in steps),
}
print(json.dumps(document, indent=1))
rows = ["| step | seconds | status |", "|---|---|---|"] + [f"| {s['step']} | {s['seconds']} | {s['status']} |" for s in steps]
title = (f"GPU check on {document['gpu'] or 'CPU (dry run)'}, torch {document['torch']}: {train} training samples, "
         f"{cert} certified; whole commands timed, process start and data loading included")
table = "\n".join([title, "", *rows, "", f"GPU verdicts equal CPU verdicts: {document['gpu_matches_cpu']}"])
print(table)
Path(results, "gpu_check.json").write_text(json.dumps(document, indent=1) + "\n")
Path(results, "gpu_check.md").write_text(table + "\n")
sys.exit(0 if document["all_ok"] else 1)
EOF
