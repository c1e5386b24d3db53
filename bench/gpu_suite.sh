#!/usr/bin/env bash
# Every GPU benchmark in one go (under 8 minutes on an H200), then one table with the bars and the ratios against
# the public anchors (DESIGN §6, issue 18):
#   rollout b1/b8 on the recipe's sampling path: DiT and end-to-end frames/s, decode s/video, peak GiB
#   train step: s/sample (optimiser step included) and peak GiB
#   streaming memory: peak GiB and step s of one window step at 81 .. 960 pixel frames, and their ratio
#   rewards: s/video and peak GiB of each learned reward
#
#   bash bench/gpu_suite.sh            # CUDA, full size
#   bash bench/gpu_suite.sh --tiny     # tiny models on the CPU (what CI runs; a minute or two)
#
# Environment: PYTHON (default python), REWARDS (comma-separated subset for bench/rewards.py), OUT (folder for the
# raw JSON lines; default a temporary folder). Each benchmark's stderr goes to $OUT/<name>.log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
tiny=()
repeats=(--repeats 3 --warmup 1)
if [[ "${1:-}" == "--tiny" ]]; then
  tiny=(--tiny)
  repeats=(--repeats 1 --warmup 0)
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu_suite.sh [--tiny]" >&2
  exit 2
fi
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"

run() {  # name, script, args...: keep the script's one JSON line, or record its failure
  local name="$1" script="$2"
  shift 2
  echo "== $name" >&2
  if "$py" "$here/$script" "$@" >"$out/$name.json" 2>"$out/$name.log"; then
    tail -n 1 "$out/$name.json" >"$out/$name.line"
  else
    echo "{\"failed\": \"$name: see $out/$name.log\"}" >"$out/$name.line"
    tail -n 5 "$out/$name.log" >&2
  fi
}

run rollout rollout.py "${tiny[@]}" "${repeats[@]}" --batches 1,8 --path recipe
run train_step train_step.py "${tiny[@]}" "${repeats[@]}"
stream_args=("${tiny[@]}" "${repeats[@]}")
if [[ ${#tiny[@]} -gt 0 ]]; then
  stream_args+=(--frames 81 240)  # the mechanism at two lengths: the tiny model commits histories slowly on a CPU
fi
run streaming_memory streaming_memory.py "${stream_args[@]}"
run rewards rewards.py "${tiny[@]}" "${repeats[@]}" ${REWARDS:+--rewards "$REWARDS"}

"$py" - "$out" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
def load(name):
    f = out / f"{name}.line"
    return json.loads(f.read_text()) if f.exists() else None

GIB = 1e9 / 2**30  # the benches report GB (1e9 bytes)
rows = []  # (measure, value, bar, ratio against the public anchor)
roll, train, stream, rew = (load(n) for n in ("rollout", "train_step", "streaming_memory", "rewards"))
device = next((r["device"] for r in (roll, train, rew) if r and "device" in r), "?")
full_size = bool(roll and roll.get("model") == "wan_1_3b") and device not in ("cpu", "?")
if roll and "failed" not in roll:
    for r in roll["results"]:
        b = r["batch"]
        rows.append((f"rollout b{b} DiT frames/s", r["dit_frames_per_s"], ">= 50 (b8)" if b == 8 else "",
                     f"{r['dit_frames_per_s'] / 32.4:.2f}x public" if b == 8 else ""))
        if "frames_per_s" in r:
            rows.append((f"rollout b{b} end-to-end frames/s", r["frames_per_s"], ">= 40 (b8)" if b == 8 else "",
                         f"{r['frames_per_s'] / 19.5:.2f}x public" if b == 8 else ""))
            per_video = r["decode_s_median"] / b
            rows.append((f"decode b{b} s/video", per_video, "<= 0.55", f"{1.65 / per_video:.2f}x public"))
        rows.append((f"rollout b{b} peak GiB", r["peak_mem_gb"] / GIB, "", ""))
    rows.append(("sampling-copy merge s", roll.get("merge_s_median", float("nan")), "", ""))
elif roll:
    rows.append((roll["failed"], float("nan"), "", ""))
if train and "failed" not in train:
    rows.append(("train step s/sample", train["s_per_sample"], "<= 2.0", f"{6.0 / train['s_per_sample']:.2f}x official-style"))
    if train.get("peak_mem_gb") is not None:
        rows.append(("train step peak GiB", train["peak_mem_gb"] / GIB, "", ""))
elif train:
    rows.append((train["failed"], float("nan"), "", ""))
if stream and "failed" in stream:
    rows.append((stream["failed"], float("nan"), "", ""))
elif stream:
    for r in stream["results"]:
        rows.append((f"streaming {r['pixel_frames']} frames peak GiB", (r["peak_mem_gb"] or float("nan")) / GIB, "", ""))
        rows.append((f"streaming {r['pixel_frames']} frames step s", r["step_s_median"], "", ""))
    if stream.get("peak_ratio_longest") is not None:
        rows.append(("streaming peak longest / shortest", stream["peak_ratio_longest"], "<= 1.10", ""))
if rew and "failed" not in rew:
    for r in rew["results"]:
        rows.append((f"reward {r['reward']} s/video", r["latency_s_per_video"], "", ""))
        rows.append((f"reward {r['reward']} peak GiB", r["peak_mem_gb"] / GIB, "", ""))
elif rew:
    rows.append((rew["failed"], float("nan"), "", ""))
print(f"gpu_suite on {device} (raw JSON in {out})")
if not full_size:
    print("not the full 1.3B geometry on a GPU: the bars and the public anchors do not apply")
print(f"{'measure':<36} {'value':>10}  {'bar':<12} vs anchor")
for name, value, bar, ratio in rows:
    if not full_size:
        ratio = "" if ratio.endswith(("public", "official-style")) else ratio
        bar = ""
    # %.4g, not a fixed number of decimals: a sub-millisecond timing must not print as 0.000 (issue 26)
    print(f"{name:<36} {value:>10.4g}  {bar:<12} {ratio}")
failed = [n for n in ("rollout", "train_step", "streaming_memory", "rewards") if (load(n) or {}).get("failed")]
sys.exit(1 if failed else 0)
PY
