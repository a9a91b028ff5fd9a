#!/usr/bin/env bash
# CUDA check of decodekit's GPU paths, made for the borrowed H200 (the `run` device tool; nothing can be
# downloaded there). It checks, in order:
#   (a) the carried wheels in .whl/ install into $SITE (jsonschema & deps, lark, outlines_core: `import decodekit`);
#   (b) a random-weight model with SmolLM2-135M's exact architecture (config + tokenizer from .devcarry/smollm2-135m,
#       no weights), bfloat16, saved with save_pretrained to $MODEL_DIR;
#   (c) the tiny-model tests on the GPU (DECODEKIT_TEST_DEVICE=cuda; real-model tests skip there);
#   (d) bench.throughput --quick on the random model in bfloat16 (decodekit and transformers on one model object);
#   (e) public-API checks: greedy speculative (ngram) == plain greedy token for token (bf16 and float32),
#       seeded sampling reproducible, a regex constraint honoured;
#   (d') the full bench.throughput run (skipped with QUICK_ONLY=1).
# Everything is logged to $OUT/cuda_check.log (pytest also to $OUT/tests.log); the throughput results land in
# $OUT/quick and $OUT/full: 6 files, within what the device tool brings back.
#
# Prepare here (once; both folders are in .git/info/exclude):
#   .whl/      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#              --platform manylinux_2_17_x86_64 ... -d .whl jsonschema==4.26.0 jsonschema-specifications==2025.9.1
#              referencing==0.37.0 rpds-py==2026.9.1 lark==1.3.1 outlines_core==0.2.14
#   .devcarry/ smollm2-135m/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,
#              chat_template.jinja} from ~/.cache/decodekit/hf/smollm2-135m, and data/spec_bench/question.jsonl
#              from ../shared/data (DECODEKIT_DATA points there)
# Run through the device tool:
#   run(command="bash bench/cuda_check.sh", carry=[".whl", ".devcarry"], timeout_s=420)
# Local dry run of the logic on CPU:
#   DEVICE=cpu PY=.venv/bin/python SKIP_WHEELS=1 QUICK_ONLY=1 OUT=/tmp/cc bash bench/cuda_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-/tmp/cuda_check_out}
SITE=${SITE:-/tmp/site}
CARRY=${CARRY:-.devcarry}
MODEL_DIR=${MODEL_DIR:-/tmp/smollm2-random}
DEADLINE=${DEADLINE:-400}  # seconds for the whole script: keep it under the run's timeout_s (420)
DTYPE=${DTYPE:-bfloat16}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DECODEKIT_DATA="$PWD/$CARRY/data" DEVICE MODEL_DIR
status=0
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s in)"; }
cap() { local left=$(( DEADLINE - SECONDS )); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }  # step timeout

step "(a) environment and carried wheels"
{
    if [ -z "${SKIP_WHEELS:-}" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { echo "wheel install FAILED"; exit 1; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, transformers, decodekit, jsonschema, lark, outlines_core; \
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} || { echo "setup failed"; exit 1; }

step "(b) random-weight SmolLM2-135M architecture, bfloat16 -> $MODEL_DIR"
$PY - "$CARRY/smollm2-135m" 2>&1 <<'EOF' || { echo "model build failed"; exit 1; }
import os, shutil, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = sys.argv[1], os.environ["MODEL_DIR"]
t0 = time.perf_counter()
config = AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(dst)
for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(os.path.join(src, name), dst)
n = sum(p.numel() for p in model.parameters())
print(f"{type(model).__name__}: {n / 1e6:.1f}M params, {config.num_hidden_layers} layers, {model.dtype}, "
      f"saved in {time.perf_counter() - t0:.1f}s: {sorted(os.listdir(dst))}")
EOF

step "(c) tiny-model tests on $DEVICE"
TESTS=${TESTS:-"tests/test_hf_backend.py tests/test_engine.py tests/test_speculative.py tests/test_tree.py tests/test_entropy.py"}
DECODEKIT_TEST_DEVICE=$DEVICE timeout "$(cap 200)" $PY -m pytest -q -x -p no:cacheprovider -rs $TESTS 2>&1 \
    | tee "$OUT/tests.log"
rc=$?
echo "pytest -x rc=$rc"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then  # -x stopped early: one more pass lists every failure
    status=1
    step "(c') the same tests without -x"
    DECODEKIT_TEST_DEVICE=$DEVICE timeout "$(cap 120)" $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
        | tee -a "$OUT/tests.log" | tail -n 80
elif [ "$rc" -eq 124 ]; then
    status=1
fi

step "(d) bench.throughput --quick, $DTYPE, $DEVICE"
mkdir -p "$OUT/quick"
timeout "$(cap 90)" $PY -m bench.throughput --quick --model "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --out "$OUT/quick" || status=1

step "(e) public API on $DEVICE: speculative greedy parity, seeded sampling, regex constraint"
timeout "$(cap 120)" $PY - 2>&1 <<'EOF' || status=1
import os, re, time
import torch
from decodekit import LLM, Constrained, Regex, Speculative

device, path = os.environ["DEVICE"], os.environ["MODEL_DIR"]
prompts = ["Write a haiku about the sea.", "List the numbers from one to twenty, separated by commas.",
           "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat sat on the"]
ok = True
for dtype in ("bfloat16", "float32"):
    llm = LLM(path, device=device, dtype=dtype)
    model = llm.backend.model
    t0 = time.perf_counter()
    plain = llm.generate(prompts, temperature=0, max_new_tokens=64, ignore_eos=True)
    t1 = time.perf_counter()
    spec = llm.generate(prompts, strategy=Speculative(draft="ngram"), temperature=0, max_new_tokens=64,
                        ignore_eos=True)
    t2 = time.perf_counter()
    print(f"[{dtype} on {model.device}] plain {t1 - t0:.2f}s, speculative {t2 - t1:.2f}s; spec stats: "
          f"{ {k: v for k, v in spec[0].stats.extra.items() if not isinstance(v, (list, dict))} }")
    for i, (p, s) in enumerate(zip(plain, spec)):
        a, b = list(p.token_ids), list(s.token_ids)
        if a == b:
            print(f"  prompt {i}: identical ({len(a)} tokens)")
            continue
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ids = list(p.prompt_token_ids) + a[:j]
        with torch.inference_mode():
            top = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().topk(2)
        gap = float(top.values[0] - top.values[1])
        print(f"  prompt {i}: DIFFERS at token {j}/{len(a)} (plain {a[j:j + 3]}, spec {b[j:j + 3]}); "
              f"no-cache top-2 logit gap there {gap:.3g} (ids {top.indices.tolist()})")
        if dtype == "float32" or gap > 0.1:  # bf16 near-ties can flip between batched shapes; float32 must match
            ok = False

llm = LLM(path, device=device, dtype="bfloat16")
a = llm.generate(prompts, temperature=0.8, seed=7, max_new_tokens=32, ignore_eos=True)
b = llm.generate(prompts, temperature=0.8, seed=7, max_new_tokens=32, ignore_eos=True)
same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
print("seeded sampling reproducible:", same)
ok &= all(same)
c = llm.generate("The date today is", strategy=Constrained(Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")), max_new_tokens=16)
match = bool(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", c.text))
print(f"regex constraint: {c.text!r} finish={c.finish_reason} fullmatch={match}")
ok &= match
if device == "cuda":
    print(f"max GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
print("API CHECKS", "PASSED" if ok else "FAILED")
raise SystemExit(0 if ok else 1)
EOF

if [ -n "${QUICK_ONLY:-}" ]; then
    echo "QUICK_ONLY set: no full throughput run"
elif [ $(( DEADLINE - SECONDS )) -lt 75 ]; then
    echo "only $(( DEADLINE - SECONDS ))s left of DEADLINE=$DEADLINE: no full throughput run"
else
    step "(d') bench.throughput (full), $DTYPE, $DEVICE"
    mkdir -p "$OUT/full"
    timeout "$(cap 300)" $PY -m bench.throughput --model "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
        --out "$OUT/full" || status=1
fi
step "done, status=$status"
sleep 1  # let tee finish writing cuda_check.log
exit $status
