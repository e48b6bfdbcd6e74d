#!/usr/bin/env bash
# One-shot GPU check of m3-queue's encoder: environment, encoder tests, golden outputs on CUDA, and the
# encoder benchmark against FlagEmbedding's BGEM3FlagModel (float32 and float16) on a large replica.
#
#   bash bench/gpu_check.sh                                          # from the repository root, on a CUDA box
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=small bash bench/gpu_check.sh  # a quick dry run of the logic on cpu
#
# Everything is printed and also written to $OUT/gpu_check.log (OUT defaults to /tmp/m3q-gpu-check).
# Knobs (environment): GPU_CHECK_DEVICE (cuda), GPU_CHECK_SIZE (large), GPU_CHECK_DOCS (800),
# GPU_CHECK_TOKENS (250000), GPU_CHECK_QUERIES (100), GPU_CHECK_ROUNDS (2), GPU_CHECK_WHEELS (.whl),
# PYTHON (python3).
#
# With the project installed normally (`pip install -e .[worker,reference,test]`) nothing is installed.
# Otherwise, on a machine without network, missing packages come from wheels beside the tree:
#   .whl/site/*.whl  celery, kombu, redis, ... (the test fixtures import them)  -> pip --target /tmp/site
#   .whl/ref/*.whl   FlagEmbedding 1.4.2 with a transformers 4.57 stack (it does not import under
#                    transformers 5)  -> pip --target /tmp/ref, used only by the benchmark
# Each step's exit status is summed up at the end; a failing step does not stop the later ones.
NAME=gpu-check DEV=${GPU_CHECK_DEVICE:-cuda} SIZE=${GPU_CHECK_SIZE:-large}
GPU_WHEELS=${GPU_CHECK_WHEELS:-.whl}
source "$(dirname "$0")/gpu_common.sh"
declare -A STATUS

step() { echo; echo "================ $* ================ ($(date +%T))"; }

record() {  # record NAME COMMAND...: run it, keep its exit status
    local name=$1; shift
    local start=$SECONDS
    "$@"
    STATUS[$name]=$?
    echo "---- $name: exit ${STATUS[$name]} after $((SECONDS - start)) s"
}

environment() {
    nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    "$PY" - <<'EOF'
import platform, torch, transformers, tokenizers, huggingface_hub
print(f"python {platform.python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
      f"tokenizers {tokenizers.__version__}  huggingface_hub {huggingface_hub.__version__}")
print(f"cuda available {torch.cuda.is_available()}  torch cuda {torch.version.cuda}  "
      f"threads {torch.get_num_threads()}  cpus {__import__('os').cpu_count()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}  "
          f"matmul tf32 {torch.backends.cuda.matmul.allow_tf32}  float32 matmul precision "
          f"{torch.get_float32_matmul_precision()}")
EOF
}

REF_PATH=""   # prepended to PYTHONPATH for the benchmark only
REFERENCE=""  # "flag" once FlagEmbedding's BGEM3FlagModel imports
reference_packages() {
    local probe="from FlagEmbedding import BGEM3FlagModel; import FlagEmbedding, transformers; print('FlagEmbedding', FlagEmbedding.__file__, 'transformers', transformers.__version__)"
    if "$PY" -c "$probe" 2>/dev/null; then REFERENCE=flag; return 0; fi
    echo "FlagEmbedding does not import here (expected under transformers 5): trying $WHEELS/ref"
    install_wheels "$WHEELS/ref" /tmp/ref || return 1
    PYTHONPATH=/tmp/ref${PYTHONPATH:+:$PYTHONPATH} "$PY" -W ignore -c "$probe" || return 1
    REF_PATH=/tmp/ref REFERENCE=flag
}

encoder_tests() {
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short --timeout 300 tests/test_encoder.py
}

golden_on_device() {  # the golden tests run on cpu only: the same comparisons on $DEV, and low precision
    DEV=$DEV MODEL=$MODEL timeout 200 "$PY" - <<'EOF'
import os, sys
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from bench import corpus
from worker.encoder import Encoder

dev, big = os.environ["DEV"], os.environ["MODEL"]
TINY = "tests/data/tiny-bge-m3"
g = dict(np.load("tests/data/golden.npz"))
low = ["float16", "bfloat16"] if dev.startswith("cuda") else ["bfloat16"]
failed = False


def golden(kind):
    so, co = g[f"{kind}_sparse_offsets"], g[f"{kind}_colbert_offsets"]
    ids, w = g[f"{kind}_sparse_ids"], g[f"{kind}_sparse_weights"]
    return [(g[f"{kind}_dense"][i], dict(zip(ids[so[i]:so[i + 1]].tolist(), w[so[i]:so[i + 1]].tolist())),
             g[f"{kind}_colbert"][co[i]:co[i + 1]]) for i in range(len(g[f"{kind}_texts"]))]


def triples(enc, texts, kind):
    return [(i.dense, i.sparse_dict(), i.colbert) for i in enc.encode(texts, kind, colbert=True).items]


def compare(label, ours, refs, texts, tol):
    """Max abs differences over all texts; texts whose sparse ids or ColBERT rows differ are listed."""
    global failed
    worst, odd = {"dense": 0.0, "sparse": 0.0, "colbert": 0.0}, []
    for i, ((d, s, c), (rd, rs, rc)) in enumerate(zip(ours, refs)):
        worst["dense"] = max(worst["dense"], float(np.abs(d - rd).max()))
        worst["sparse"] = max([worst["sparse"]] + [abs(s[k] - rs[k]) for k in s.keys() & rs.keys()])
        if c.shape == rc.shape:
            worst["colbert"] = max(worst["colbert"], float(np.abs(c - rc).max()))
        if set(s) != set(rs) or c.shape != rc.shape:
            odd.append(f"#{i} {texts[i][:40]!r}: sparse ids {len(s)} vs {len(rs)} "
                       f"({len(set(s) ^ set(rs))} differ), colbert rows {len(c)} vs {len(rc)}")
    ok = not odd and max(worst.values()) <= tol
    failed |= not ok
    print(f"{'PASS' if ok else 'FAIL'} {label}: max |diff| dense {worst['dense']:.2e} sparse {worst['sparse']:.2e} "
          f"colbert {worst['colbert']:.2e} (tol {tol:g}); texts with other ids/rows: {len(odd)}")
    for line in odd:
        print("     ", line)


def cosines(a, b):
    a, b = np.stack([x[0] for x in a]), np.stack([x[0] for x in b])
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


print(f"-- tiny checkpoint on {dev} vs tests/data/golden.npz ({', '.join(g['versions'].tolist())}) and vs cpu")
cpu = Encoder.load(TINY, "cpu", "float32")
f32 = Encoder.load(TINY, dev, "float32")
for kind in ("documents", "queries"):
    texts = g[f"{kind}_texts"].tolist()
    ours = triples(f32, texts, kind)
    compare(f"{dev} float32 {kind} vs golden", ours, golden(kind), texts, 1e-5)
    compare(f"{dev} float32 {kind} vs cpu float32", ours, triples(cpu, texts, kind), texts, 1e-5)
    for dtype in low:
        c = cosines(triples(Encoder.load(TINY, dev, dtype), texts, kind), ours)
        failed |= c.min() < 0.99
        print(f"{'PASS' if c.min() >= 0.99 else 'FAIL'} {dev} {dtype} {kind}: min dense cosine vs float32 "
              f"{c.min():.5f} (mean {c.mean():.5f}, need >= 0.99)")

print(f"\n-- {big} (random weights) on {dev}")
enc = Encoder.load(big, dev, "float32")
docs = corpus.documents(24, 9000, enc.tokenizer) + [corpus.documents(1, 8000, enc.tokenizer, seed=3)[0]]
lengths = [len(p.ids) for p in enc.prepare(docs)]
print(f"{len(docs)} documents, {sum(lengths):,} tokens, longest {max(lengths):,}")
ref = triples(enc, docs, "documents")
if dev != "cpu":
    few = docs[:4]
    compare(f"{dev} float32 vs cpu float32 (4 documents)", ref[:4],
            triples(Encoder.load(big, "cpu", "float32"), few, "documents"), few, 1e-3)
del enc
for dtype in low:
    enc = Encoder.load(big, dev, dtype)
    out = triples(enc, docs, "documents")
    c = cosines(out, ref)
    w = max(abs(s[k] - rs[k]) for (_, s, _), (_, rs, _) in zip(out, ref) for k in s.keys() & rs.keys())
    finite = all(np.isfinite(x[0]).all() and np.isfinite(x[2]).all() for x in out)
    failed |= c.min() < 0.99 or not finite
    print(f"{'PASS' if c.min() >= 0.99 and finite else 'FAIL'} {dtype}: min dense cosine vs float32 {c.min():.5f} "
          f"(the {lengths[int(c.argmin())]:,}-token document), max sparse weight diff {w:.2e}, all finite {finite}")
    del enc
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
sys.exit(1 if failed else 0)
EOF
}

benchmark() {
    local ref=(--skip-reference)
    [ -n "$REFERENCE" ] && ref=(--reference "$REFERENCE")
    PYTHONPATH=$REF_PATH${REF_PATH:+${PYTHONPATH:+:}}${PYTHONPATH:-} timeout 270 "$PY" -W ignore bench/encoder.py \
        --model "$MODEL" --device "$DEV" "${ref[@]}" --rounds "${GPU_CHECK_ROUNDS:-2}" \
        --docs "${GPU_CHECK_DOCS:-800}" --tokens "${GPU_CHECK_TOKENS:-250000}" --queries "${GPU_CHECK_QUERIES:-100}"
}

engine_slicing() {  # queries during a bulk encode, in-process: document steps sliced (25 ms) and whole
    timeout 150 "$PY" -W ignore bench/load.py engine --model "$MODEL" --device "$DEV" --docs 2400 --preempt-ms 0,25
}

main() {
    local start=$SECONDS
    step "1. environment";                   record environment environment
    step "setup: packages from wheels";      record site_packages site_packages
                                             record reference_packages reference_packages
    step "2. replica ($SIZE) -> $MODEL";     record replica replica
    step "3a. tests/test_encoder.py";        record encoder_tests encoder_tests
    step "3b. golden outputs on $DEV";       record golden_on_device golden_on_device
    if [ "${STATUS[replica]}" = 0 ]; then
        step "4. benchmark on $DEV, reference: ${REFERENCE:-none}"; record benchmark benchmark
        step "5. queries during bulk, in-process engine on $DEV";   record engine_slicing engine_slicing
    fi
    step "summary (exit status per step; $((SECONDS - start)) s in all)"
    for name in environment site_packages reference_packages replica encoder_tests golden_on_device benchmark engine_slicing; do
        printf '  %-20s %s\n' "$name" "${STATUS[$name]:-not run}"
    done
}

main 2>&1 | tee "$OUT/gpu_check.log"
