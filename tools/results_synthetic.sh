#!/usr/bin/env bash
# Reproduces every number of docs/RESULTS.md on the synthetic set, 2 CPU ranks (~18 min on a 2-core machine).
#
#   tools/results_synthetic.sh            # every comparison with seed 0 and with each of EXTRA_SEEDS (1)
#   STEPS=500 EXTRA_SEEDS= tools/results_synthetic.sh
#
# Runs go to runs/results/<name> (logs, result.json, eval.json) and checkpoints/results/<name>; both are git-ignored
# and rebuilt from scratch (train.resume=none). Every command is echoed with its wall time into
# runs/results/commands.log, and runs/results/tables.md gathers the comparisons (tools/results_tables.py).
# The same number of stage-2 steps, batch and image tower on both sides of every comparison, one eval set.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1

STEPS=${STEPS:-200}              # stage-2 steps: LLM2CLIP, ProCLIP, and the CLIP text-tower baseline alike
CC_STEPS=${CC_STEPS:-100}        # LLM2CLIP stage 1 (caption contrastive)
INHERIT_STEPS=${INHERIT_STEPS:-200}  # ProCLIP stage 1 (representation inheritance)
EXTRA_SEEDS=${EXTRA_SEEDS-1}     # seeds after 0 for every stage-2 run and the baseline; "" for none
TASKS=long_retrieval,retrieval,zeroshot,cra

PY=.venv/bin/python
LLM2CLIP=(.venv/bin/torchrun --standalone --nproc_per_node 2 -m llm2clip_scale)
R=runs/results
C=checkpoints/results
mkdir -p "$R" "$C"
: > "$R/commands.log"

run() {  # echo the command, run it, log its wall time
    echo "+ $*" | tee -a "$R/commands.log"
    local start=$SECONDS
    "$@"
    echo "  wall $((SECONDS - start)) s" | tee -a "$R/commands.log"
}

started=$SECONDS
{ echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"; echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  echo "machine: $(nproc --all) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "STEPS=$STEPS CC_STEPS=$CC_STEPS INHERIT_STEPS=$INHERIT_STEPS EXTRA_SEEDS=$EXTRA_SEEDS"; } | tee -a "$R/commands.log"

if ! grep -q '"format": 2' data/synthetic/dataset.json 2>/dev/null; then
    run $PY data_prep/make_synthetic.py --out data/synthetic  # builds it, or adds the format-2 eval fields in place
fi

# --- the CLIP-style baseline (comparison 3), also ProCLIP's "pretrained CLIP": tiny_cpu.yaml's image tower,
# embed_dim, caption mix and max_text_len, a CLIP text transformer instead of LLM + adapter, STEPS steps of batch 64.
clip_baseline() {  # seed
    run $PY data_prep/train_reference_clip.py --data data/synthetic --out "$C/clip_s$1" --steps "$STEPS" --batch 64 \
        --seed "$1"
    run $PY tools/eval_reference_clip.py configs/tiny_cpu.yaml --model "$C/clip_s$1" --out "$R/clip_s$1/eval.json"
}

# --- LLM2CLIP stage 2, then every eval task on its checkpoint: on the stage-1-tuned LLM (llm2clip_s2_s<seed>), or
# with "nocc" on the untuned one (stage2_nocc_s<seed>: what stage 1 adds).
llm2clip_stage2() {  # seed [nocc]
    local name=llm2clip_s2_s$1 tower=(configs/tiny_cpu.yaml "model.llm.lora_init=$C/cc_s0")
    if [[ ${2:-} == nocc ]]; then name=stage2_nocc_s$1 tower=(configs/tiny_cpu.yaml); fi
    run "${LLM2CLIP[@]}" train "${tower[@]}" train.steps="$STEPS" train.seed="$1" eval.interval=50 \
        checkpoint.dir="$C/$name" logging.dir="$R/$name" train.resume=none
    run "${LLM2CLIP[@]}" eval "${tower[@]}" checkpoint.dir="$C/$name" logging.dir="$R/$name" --tasks "$TASKS" \
        --checkpoint "$C/$name"
}

# --- ProCLIP: stage 1 distils the baseline CLIP's text encoder into the adapter (over the untuned LLM, as
# configs/proclip_*_tiny.yaml are set up); stage 2 starts from that CLIP's image trunk and projection.
proclip() {  # seed (needs clip_s<seed>)
    local warm=(model.vision.pretrained_path="$C/clip_s$1/vision.safetensors"
                model.vision_head_init="$C/clip_s$1/vision.safetensors"
                model.adapter_init="$C/proclip_inherit_s$1/adapter.safetensors")
    run "${LLM2CLIP[@]}" train configs/proclip_inherit_tiny.yaml proclip.teacher_text="$C/clip_s$1/text" \
        train.steps="$INHERIT_STEPS" train.seed="$1" checkpoint.dir="$C/proclip_inherit_s$1" \
        logging.dir="$R/proclip_inherit_s$1" train.resume=none
    run "${LLM2CLIP[@]}" train configs/proclip_stage2_tiny.yaml "${warm[@]}" train.steps="$STEPS" train.seed="$1" \
        eval.interval=50 checkpoint.dir="$C/proclip_s2_s$1" logging.dir="$R/proclip_s2_s$1" train.resume=none
    run "${LLM2CLIP[@]}" eval configs/proclip_stage2_tiny.yaml "${warm[@]}" checkpoint.dir="$C/proclip_s2_s$1" \
        logging.dir="$R/proclip_s2_s$1" --tasks "$TASKS" --checkpoint "$C/proclip_s2_s$1"
}

# 1. LLM2CLIP stage 1: caption-contrastive LoRA; result.json holds CRA before/after (short -> long caption). The
#    paper-protocol CRA (caption 1 -> caption 2) is the `cra` task of the stage-2 evals below, with and without
#    lora_init (the LLM alone decides it: stage 2 keeps it frozen). One stage 1 (seed 0) serves every seed below.
run "${LLM2CLIP[@]}" train configs/llm2clip_cc_tiny.yaml train.steps="$CC_STEPS" train.seed=0 \
    checkpoint.dir="$C/cc_s0" logging.dir="$R/cc_s0" train.resume=none

# 2.-4. per seed: LLM2CLIP stage 2 on the tuned and on the untuned LLM, the CLIP-style baseline, ProCLIP.
for seed in 0 $EXTRA_SEEDS; do
    llm2clip_stage2 "$seed"
    llm2clip_stage2 "$seed" nocc
    clip_baseline "$seed"
    proclip "$seed"
done

run .venv/bin/llm2clip-scale report "$R/llm2clip_s2_s0" --out docs/results_stage2.png
run $PY tools/results_tables.py "$R" --out "$R/tables.md"
echo "total wall $((SECONDS - started)) s" | tee -a "$R/commands.log"
