#!/usr/bin/env bash
# Throughput check on one GPU, in one call of at most 9 minutes, ending in a block to paste into the README.
#
#   bash benchmarks/gpu_check.sh              # GPU: 8B-shape random Llama, bf16, realistic corpus
#   bash benchmarks/gpu_check.sh --cpu        # the same steps, shrunk to a few minutes on a CPU
#   bash benchmarks/gpu_check.sh --model-only # build the model and stop (start it early, in the background)
#
# On a GPU machine without vLLM, where a vLLM bundle is staged in pieces under .gpu/ (the last piece in
# .gpu/d with its install-on-device.sh), the last call is
#   cp .gpu/d/part_* /tmp/stage/ && bash benchmarks/gpu_check.sh
# (the model can be started in the first call: setsid nohup bash benchmarks/gpu_check.sh --model-only &).
# Dependencies missing from such a machine (orjson, tenacity, zstandard) go as wheels in .gpu/d/wheels
# (pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .gpu/d/wheels
# orjson tenacity zstandard).
#
# Steps: install, versions, model, harness paths c e p a d (one process each, under its own timeout, each
# row printed when measured), serve --scoring pooled under VLLM_USE_V2_MODEL_RUNNER=0 and =1, summary.
# Every step also stops at the overall deadline (GPU_CHECK_TOTAL_S) so that the summary always prints.
#
# Settings (environment; GPU default / --cpu default):
#   GPU_CHECK_MODEL      model directory, built there unless it holds a config.json (/tmp/gpu-check-model)
#   GPU_CHECK_WORK       scratch (/tmp/gpu-check)
#   GPU_CHECK_DOCS       documents (256 / 48); GPU_CHECK_DOC_TOKENS: their median length (400 / 200)
#   GPU_CHECK_KS         k values (16,256); GPU_CHECK_DTYPE (bfloat16 / float32)
#   GPU_CHECK_MEM        engine memory fraction (0.85 / 0.1)
#   GPU_CHECK_TOTAL_S    the whole run (520 / 900), GPU_CHECK_T_<STEP> each step's seconds (see below)
#   GPU_CHECK_WHEELS     extra wheels to install (.gpu/d/wheels); GPU_CHECK_PYTHON (.venv's python, else python3)
set -uo pipefail

cpu=${TEACHER_FARM_GPU_CHECK_CPU:-0}
model_only=0
for arg in "$@"; do
    case $arg in
        --cpu) cpu=1 ;;
        --model-only) model_only=1 ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then py=$GPU_CHECK_PYTHON
elif [[ -x .venv/bin/python ]]; then py=$root/.venv/bin/python
else py=python3; fi

if [[ $cpu == 1 ]]; then
    # A tiny model, so every step runs here in minutes; float32 and eager, as vLLM's CPU build wants. Engine
    # starts take about a minute on two busy cores, hence the longer steps.
    : "${GPU_CHECK_MODEL:=/tmp/gpu-check-cpu-model}" "${GPU_CHECK_WORK:=/tmp/gpu-check-cpu}"
    : "${GPU_CHECK_DOCS:=40}" "${GPU_CHECK_DOC_TOKENS:=100}" "${GPU_CHECK_DTYPE:=float32}" "${GPU_CHECK_MEM:=0.1}"
    : "${GPU_CHECK_TOTAL_S:=1200}" "${GPU_CHECK_T_C:=150}" "${GPU_CHECK_T_E:=180}" "${GPU_CHECK_T_P:=180}"
    : "${GPU_CHECK_T_A:=240}" "${GPU_CHECK_T_D:=120}" "${GPU_CHECK_T_SMOKE:=150}"
    shape=(--vocab 4096 --hidden 128 --intermediate 256 --layers 1 --heads 2 --kv-heads 1)
else
    : "${GPU_CHECK_MODEL:=/tmp/gpu-check-model}" "${GPU_CHECK_WORK:=/tmp/gpu-check}"
    : "${GPU_CHECK_DOCS:=256}" "${GPU_CHECK_DOC_TOKENS:=400}" "${GPU_CHECK_DTYPE:=bfloat16}" "${GPU_CHECK_MEM:=0.85}"
    # 9 minutes a call, less the margin for the summary and the call's own start.
    : "${GPU_CHECK_TOTAL_S:=520}"
    # Llama-3.1-8B.
    shape=(--vocab 128256 --hidden 4096 --intermediate 14336 --layers 32 --heads 32 --kv-heads 8)
fi
: "${GPU_CHECK_KS:=16,256}" "${GPU_CHECK_WHEELS:=.gpu/d/wheels}"
# Seconds per step. Measured on an H200: install about 60, model 18 on the GPU plus saving 16 GB, each 8B
# engine start 40-60 (eager); the paths' own work on these 256 documents is seconds.
: "${GPU_CHECK_T_INSTALL:=90}" "${GPU_CHECK_T_MODEL:=150}"
: "${GPU_CHECK_T_C:=70}" "${GPU_CHECK_T_E:=85}" "${GPU_CHECK_T_P:=85}" "${GPU_CHECK_T_A:=110}" "${GPU_CHECK_T_D:=60}"
: "${GPU_CHECK_T_SMOKE:=75}"
model=$GPU_CHECK_MODEL work=$GPU_CHECK_WORK
mkdir -p "$work"
started=$SECONDS

# Seconds a step may take: its own budget, cut to what is left before the deadline (0: skip it).
budget() {
    local left=$((GPU_CHECK_TOTAL_S - (SECONDS - started)))
    local t=$(($1 < left ? $1 : left))
    echo $((t < 15 ? 0 : t))
}

# Ends every process a step left behind (servers run in their own sessions, so timeout alone misses
# them): each step runs with its own GPU_CHECK_TAG in the environment, which its children inherit.
reap() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}; pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        if { tr '\0' '\n' < "$env"; } 2> /dev/null | grep -qx "GPU_CHECK_TAG=$1"; then kill -9 "$pid" 2> /dev/null; fi
    done
}

# ------------------------------------------------------------------------------------------------ model
build_model() {
    local t
    if [[ -f $model/config.json ]]; then echo "model: $model (exists)"; return 0; fi
    # Another run (--model-only, started earlier) may be building it: wait for that one.
    if [[ -d $model.partial ]] && pgrep -f "gpu-check-build $model" > /dev/null; then
        echo "model: waiting for the build under way"
        t=$(budget "$GPU_CHECK_T_MODEL")
        while ((t-- > 0)) && [[ ! -f $model/config.json ]]; do sleep 1; done
        [[ -f $model/config.json ]] && return 0
        echo "model: not ready in time"; return 1
    fi
    t=$(budget "$GPU_CHECK_T_MODEL")
    echo "model: building ${shape[*]} in $model (at most $t s)"
    rm -rf "$model.partial"
    GPU_CHECK_TAG=model timeout -k 5 "$t" "$py" - "$model" "${shape[@]}" --dtype "$GPU_CHECK_DTYPE" \
        gpu-check-build "$model" << 'EOF'
# A random Llama with a WordLevel tokenizer over the whole vocabulary: the sample corpus's words first, so
# that the harness's corpus tokenizes to real ids, then filler words. Built on the GPU when there is one.
import argparse, json, sys, time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads"):
    p.add_argument("--" + name.replace("_", "-"), type=int)
p.add_argument("--dtype")
a, _ = p.parse_known_args()
started = time.monotonic()
bos, eos, unk = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
words = [bos, eos, unk]
seen = set(words)
for line in open("examples/sample.jsonl", encoding="utf-8"):
    for w in json.loads(line)["text"].split():
        if w not in seen and len(words) < a.vocab:
            seen.add(w)
            words.append(w)
words += [f"<w{i}>" for i in range(a.vocab - len(words))]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
tmp = a.out.with_name(a.out.name + ".partial")
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                        model_max_length=8192).save_pretrained(tmp)
config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=0, eos_token_id=1,
                     tie_word_embeddings=False, torch_dtype=a.dtype)
dtype = getattr(torch, a.dtype)
torch.manual_seed(0)
torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
torch.set_default_dtype(dtype)  # made in its dtype: half the memory and time of float32 then a cast
LlamaForCausalLM(config).save_pretrained(tmp)
tmp.rename(a.out)
print(f"model: built in {time.monotonic() - started:.0f} s")
EOF
    local rc=$?
    reap model
    [[ $rc == 0 ]] || echo "model: failed (exit $rc$( ((rc == 124)) && echo ", out of time"))"
    return $rc
}

if [[ $model_only == 1 ]]; then build_model; exit $?; fi

# ---------------------------------------------------------------------------------------------- install
echo "== install"
if [[ ! -d /tmp/site/vllm && -f .gpu/d/install-on-device.sh ]]; then
    timeout "$(budget "$GPU_CHECK_T_INSTALL")" bash .gpu/d/install-on-device.sh || echo "install: failed ($?)"
fi
if [[ -d /tmp/site ]]; then
    export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
    if compgen -G "$GPU_CHECK_WHEELS/*.whl" > /dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU_CHECK_WHEELS"/*.whl \
            2>&1 | grep -vi warning
    fi
fi
# Run from a checkout rather than installed, teacher_farm's sub-packages live in server/, client/ and
# schemas/ (mapped in pyproject.toml): a finder loaded at start-up by every Python (vLLM's workers too)
# maps them, ahead of the checkout's teacher_farm/ that the harness puts first on sys.path.
if ! "$py" -c "import teacher_farm.server, teacher_farm.client" 2> /dev/null; then
    mkdir -p "$work/shim"
    cat > "$work/shim/sitecustomize.py" << EOF
import importlib.util, sys
ROOT = "$root"
MAP = {"teacher_farm.server": "server", "teacher_farm.client": "client", "teacher_farm.schemas": "schemas"}
class CheckoutFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in MAP:
            where = f"{ROOT}/{MAP[name]}"
            return importlib.util.spec_from_file_location(name, f"{where}/__init__.py",
                                                          submodule_search_locations=[where])
        return None
sys.meta_path.insert(0, CheckoutFinder)
EOF
    export PYTHONPATH=$work/shim:$root${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$("$py" -c "
import importlib.util as u
print(' '.join(m for m in ('vllm', 'orjson', 'tenacity', 'zstandard', 'pyarrow', 'httpx') if not u.find_spec(m)))")
[[ -n $missing ]] && echo "missing modules: $missing (see the wheels note at the top)"
card=$("$py" -c "
import platform, os, torch
cpu = f'{platform.machine()} CPU, {os.cpu_count()} cores'
print(torch.cuda.get_device_name() if torch.cuda.is_available() else cpu)")
versions=$("$py" -c "
import torch, transformers
try:
    import vllm; v = vllm.__version__
except Exception as e:
    v = f'not importable ({type(e).__name__})'
print(f'vLLM {v}, torch {torch.__version__}, transformers {transformers.__version__}')")
echo "$versions; $card"

echo "== model"
build_model || echo "model: none; every later step will fail"

# -------------------------------------------------------------------------------------------------- paths
rows=() header=""
run_path() {  # key, own budget, label
    local key=$1 t out rc
    t=$(budget "$2")
    if ((t == 0)); then rows+=("| ($key) skipped: out of time | | | | | | |"); echo "${rows[-1]}"; return; fi
    echo "== ($key) $3, at most $t s"
    out=$work/path-$key.log
    GPU_CHECK_TAG=path-$key timeout -k 10 "$t" "$py" benchmarks/harness.py --work "$work/$key" --model "$model" \
        --paths "$key" --ks "$GPU_CHECK_KS" --corpus realistic --docs "$GPU_CHECK_DOCS" \
        --doc-tokens "$GPU_CHECK_DOC_TOKENS" --dtype "$GPU_CHECK_DTYPE" --gpu-memory-utilization "$GPU_CHECK_MEM" \
        --enforce-eager > "$out" 2>&1
    rc=$?
    reap "path-$key"
    if ((rc == 0)); then
        [[ -z $header ]] && header=$(grep -m1 ' docs, ' "$out")
        while IFS= read -r line; do rows+=("$line"); echo "$line"; done < <(grep '^| (' "$out")
    else
        local why
        if ((rc == 124 || rc == 137)); then why="timed out after $t s"; else why="exit $rc"; fi
        rows+=("| ($key) failed: $why: $(first_error "$out") | | | | | | |")
        echo "${rows[-1]}"
    fi
}

first_error() {  # the exception a traceback ends with, else the last line
    local line
    # JSON log lines carry their traceback escaped in one field.
    line=$(sed 's/\\n/\n/g' "$1" | grep -E '^[A-Za-z_.]*(Error|Exception)\b' | tail -n1 | cut -c1-200)
    if [[ -n $line ]]; then echo "$line"; else tail -n1 "$1" | cut -c1-200; fi
}

# Engine starts dominate on a GPU (40-60 s each for 8B), hence one path a process, ceiling first.
run_path c "$GPU_CHECK_T_C" "ceiling: engine in process, prefill only"
run_path e "$GPU_CHECK_T_E" "vLLM in process, flat prompt logprobs"
run_path p "$GPU_CHECK_T_P" "in process, pooled reduction"
run_path a "$GPU_CHECK_T_A" "teacher-farm serve (pooled) + cache into Parquet"
run_path d "$GPU_CHECK_T_D" "seed script (HF transformers, batch 1)"

# -------------------------------------------------------------------------------------------------- smoke
smokes=()
smoke() {  # VLLM_USE_V2_MODEL_RUNNER value
    local v2=$1 t out rc line
    t=$(budget "$GPU_CHECK_T_SMOKE")
    if ((t == 0)); then smokes+=("serve --scoring pooled, VLLM_USE_V2_MODEL_RUNNER=$v2: skipped, out of time")
        echo "${smokes[-1]}"; return; fi
    echo "== smoke: serve --scoring pooled, VLLM_USE_V2_MODEL_RUNNER=$v2, at most $t s"
    out=$work/smoke-v2-$v2.log
    VLLM_USE_V2_MODEL_RUNNER=$v2 GPU_CHECK_TAG=smoke-$v2 timeout -k 10 "$t" "$py" - "$py" "$model" \
        "$GPU_CHECK_DTYPE" "$GPU_CHECK_MEM" "$out.server" > "$out" 2>&1 << 'EOF'
# Start serve, one /v1/topk request, check the answer's shape, stop.
import json, subprocess, sys
import httpx

sys.path.insert(0, "benchmarks")
from harness import free_port, stop, wait_health

py, model, dtype, mem, log = sys.argv[1:]
port = free_port()
url, k = f"http://127.0.0.1:{port}", 16
server = subprocess.Popen(
    [py, "-m", "teacher_farm.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
     "--scoring", "pooled", "--k-max", str(k), "--dtype", dtype, "--gpu-memory-utilization", mem,
     "--max-model-len", "2048", "--enforce-eager"],
    stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
try:
    try:
        # serve exits (status 3) a few seconds after its engine failed to start.
        wait_health(url + "/health", server)
    except RuntimeError as exc:
        sys.exit(f"serve was never healthy: {exc}")
    text = json.loads(open("examples/sample.jsonl", encoding="utf-8").readline())["text"]
    r = httpx.post(url + "/v1/topk", json={"k": k, "inputs": [{"id": "s", "text": text}]}, timeout=120)
    if r.status_code != 200:
        sys.exit(f"/v1/topk answered {r.status_code}: {r.text[:200]}")
    res = r.json()["results"][0]
    n = len(res["input_ids"])
    shape_ok = (n > 1 and len(res["topk_ids"]) == n and all(len(row) == k for row in res["topk_ids"])
                and len(res["topk_logprobs"]) == n and len(res["target_logprobs"]) == n - 1)
    scoring = httpx.get(url + "/v1/info", timeout=10).json().get("scoring")
    if not shape_ok or scoring != "pooled":
        sys.exit(f"wrong answer: {n} input ids, {len(res['topk_ids'])} top-k rows, scoring {scoring}")
    print(f"ok: 200, {n} positions x k={k}, scoring {scoring}")
finally:
    stop(server)
EOF
    rc=$?
    reap "smoke-$v2"
    if ((rc == 0)); then line="pass ($(tail -n1 "$out"))"
    else
        if ((rc == 124 || rc == 137)); then line="FAIL (timed out after $t s)"
        else line="FAIL ($(tail -n1 "$out"))"; fi
        [[ -f $out.server ]] && line+="; first error: $(first_error "$out.server")"
        # vLLM 0.24's V2 model runner only embeds when pooling, so pooled scoring cannot run there.
        [[ $v2 == 1 ]] && line+=" [expected on vLLM 0.24: its V2 runner's pooling only embeds]"
    fi
    smokes+=("serve --scoring pooled, VLLM_USE_V2_MODEL_RUNNER=$v2: $line")
    echo "${smokes[-1]}"
}
smoke 0
smoke 1

# ------------------------------------------------------------------------------------------------ summary
# The ratio to the ceiling, which a harness run of one path cannot give.
ceiling=$(printf '%s\n' "${rows[@]}" | awk -F'|' '$2 ~ /^ \(c\)/ { gsub(/[ ,]/, "", $3); print $3 }')
echo
echo "==================== summary ($(date -u +%Y-%m-%d), $card, $((SECONDS - started)) s) ===================="
echo "$versions; one process a path; eager; ks $GPU_CHECK_KS"
echo "$header"
echo
echo "| path | tokens/s | vs ceiling | steady tokens/s | runs (tokens/s) | wire B/token | Parquet B/token |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}" | awk -F'|' -v c="${ceiling:-0}" 'BEGIN { OFS = "|" }
    { t = $3; gsub(/[ ,]/, "", t); if (c > 0 && t + 0 > 0) $4 = sprintf(" %.2f ", t / c); print }'
echo
printf -- '- %s\n' "${smokes[@]}"
