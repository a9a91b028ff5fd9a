#!/usr/bin/env bash
# CUDA check of decodekit's GPU paths, made for the borrowed H200 (the `run` device tool; nothing can be
# downloaded there). It checks, in order:
#   (a) the carried wheels in .whl/ install into $SITE (jsonschema & deps, lark, outlines_core: `import decodekit`);
#   (b) a random-weight model with SmolLM2-135M's exact architecture (config + tokenizer from .devcarry/smollm2-135m,
#       no weights), bfloat16, saved with save_pretrained to $MODEL_DIR;
#   (c) the tiny-model tests on the GPU (DECODEKIT_TEST_DEVICE=cuda; real-model tests skip there);
#   (d) decodekit.bench.throughput --quick on the random model in bfloat16 (decodekit and transformers on one model object);
#   (e) public-API checks, each reported on its own: greedy speculative (ngram) == plain greedy token for token
#       (bf16 and float32); seeded sampling and seeded speculative sampling reproducible; a regex constraint
#       honoured (sampled, and with SMC particles); a sampled tree rollout; a sampled entropy switch;
#   (d') the full decodekit.bench.throughput run (skipped with QUICK_ONLY=1).
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
#   DEVICE=cpu DTYPE=float32 PY=.venv/bin/python SKIP_WHEELS=1 QUICK_ONLY=1 OUT=/tmp/cc bash bench/cuda_check.sh
# STEPS="tests quick api full" (the default) picks steps; DEADLINE (400 s) bounds the whole script.
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
STEPS=${STEPS:-"tests quick api full"}  # which of (c) tests, (d) quick, (e) api, (d') full to run
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cuda_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DECODEKIT_DATA="$PWD/$CARRY/data" DEVICE MODEL_DIR
status=0
step() { echo; echo "=== $* ($(date +%T), ${SECONDS}s in)"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }
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

if want tests; then
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
fi

if want quick; then
step "(d) decodekit.bench.throughput --quick, $DTYPE, $DEVICE"
mkdir -p "$OUT/quick"
timeout "$(cap 90)" $PY -m decodekit.bench.throughput --quick --model "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
    --out "$OUT/quick" || status=1
fi

if want api; then
step "(e) public API on $DEVICE: speculative greedy parity, sampling, constraints, tree, entropy switch"
timeout "$(cap 120)" $PY - 2>&1 <<'EOF' || status=1
import os, re, time, traceback
import torch
from decodekit import LLM, Constrained, EntropySwitch, Regex, Speculative, TreeRollout
from decodekit.types import SamplingParams

device, path = os.environ["DEVICE"], os.environ["MODEL_DIR"]
prompts = ["Write a haiku about the sea.", "List the numbers from one to twenty, separated by commas.",
           "Repeat after me: the cat sat on the mat. The cat sat on the mat. The cat sat on the"]
results = {}


def check(name, fn):
    t0 = time.perf_counter()
    try:
        ok = fn()
    except Exception as e:  # report every check, not only the first failure
        where = [f"{f.filename.split('/main/')[-1]}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)[-3:]]
        print(f"  ERROR {type(e).__name__}: {e} (at {' <- '.join(reversed(where))})")
        ok = False
    print(f"[{'ok' if ok else 'FAIL'}] {name} ({time.perf_counter() - t0:.1f}s)")
    results[name] = bool(ok)


def greedy_parity(dtype):
    llm = LLM(path, device=device, dtype=dtype)
    model, ok = llm.backend.model, True
    plain = llm.generate(prompts, temperature=0, max_new_tokens=64, ignore_eos=True)
    spec = llm.generate(prompts, strategy=Speculative(draft="ngram"), temperature=0, max_new_tokens=64,
                        ignore_eos=True)
    print(f"  [{dtype} on {model.device}] spec stats: "
          f"{ {k: v for k, v in spec[0].stats.extra.items() if not isinstance(v, (list, dict))} }")
    for i, (p, s) in enumerate(zip(plain, spec)):
        a, b = list(p.token_ids), list(s.token_ids)
        if a == b:
            print(f"  prompt {i}: identical ({len(a)} tokens)")
            continue
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        with torch.inference_mode():
            ids = torch.tensor([list(p.prompt_token_ids) + a[:j]], device=model.device)
            top = model(ids).logits[0, -1].float().topk(2)
        gap = float(top.values[0] - top.values[1])
        print(f"  prompt {i}: DIFFERS at token {j}/{len(a)} (plain {a[j:j + 3]}, spec {b[j:j + 3]}); "
              f"no-cache top-2 logit gap there {gap:.3g}")
        ok &= dtype != "float32" and gap <= 0.1  # bf16 near-ties may flip between batch shapes; float32 may not
    return ok


check("speculative ngram greedy == plain greedy, bfloat16", lambda: greedy_parity("bfloat16"))
check("speculative ngram greedy == plain greedy, float32", lambda: greedy_parity("float32"))
llm = LLM(path, device=device, dtype="bfloat16")


def seeded(**kw):
    a = llm.generate(prompts, temperature=0.8, seed=7, max_new_tokens=24, ignore_eos=True, **kw)
    b = llm.generate(prompts, temperature=0.8, seed=7, max_new_tokens=24, ignore_eos=True, **kw)
    return all(x.token_ids == y.token_ids and len(x.token_ids) == 24 for x, y in zip(a, b))


check("seeded sampling reproducible", lambda: seeded())
check("seeded speculative (ngram) sampling reproducible", lambda: seeded(strategy=Speculative(draft="ngram")))
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


def constrained(**kw):
    c = llm.generate("The date today is", strategy=Constrained(Regex(DATE), **kw), max_new_tokens=16,
                     temperature=0.8, seed=3)
    print(f"  {c.text!r} finish={c.finish_reason}")
    return bool(re.fullmatch(DATE, c.text))


check("regex constraint, sampled", lambda: constrained())
check("regex constraint, 4 SMC particles", lambda: constrained(num_particles=4))


def tree():
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Count: one two three"}])
    (r,) = TreeRollout(segment_len=4, branch_factor=2, max_width=4, first_split=2, early_stop=None).run(
        llm.backend, [prompt], SamplingParams(max_new_tokens=12, seed=0, temperature=1.0))
    print(f"  {len(r.trajectories)} trajectories, tree_tokens {r.stats.get('tree_tokens')}")
    return len(r.trajectories) == 4


check("tree rollout, sampled", tree)


def entropy():
    small, ok = LLM(path, device=device, dtype="bfloat16").backend, True
    for tau in (0.0, float("inf")):  # all large, then all small (switching itself: the tiny-model tests)
        c = llm.generate(prompts[0], strategy=EntropySwitch(small=small, threshold=tau), temperature=0.8, seed=1,
                         max_new_tokens=16, ignore_eos=True)
        print(f"  threshold {tau}: tokens_by_model {c.stats.extra.get('tokens_by_model')}")
        ok &= len(c.token_ids) == 16
    return ok


check("entropy switch, sampled", entropy)
if device == "cuda":
    print(f"max GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
print("API CHECKS", "PASSED" if all(results.values()) else f"FAILED: {[k for k, v in results.items() if not v]}")
raise SystemExit(0 if all(results.values()) else 1)
EOF
fi

if [ -n "${QUICK_ONLY:-}" ] || ! want full; then
    echo "no full throughput run (QUICK_ONLY or STEPS)"
elif [ $(( DEADLINE - SECONDS )) -lt 75 ]; then
    echo "only $(( DEADLINE - SECONDS ))s left of DEADLINE=$DEADLINE: no full throughput run"
else
    step "(d') decodekit.bench.throughput (full), $DTYPE, $DEVICE"
    mkdir -p "$OUT/full"
    timeout "$(cap 300)" $PY -m decodekit.bench.throughput --model "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" \
        --out "$OUT/full" || status=1
fi
step "done, status=$status"
sleep 1  # let tee finish writing cuda_check.log
exit $status
