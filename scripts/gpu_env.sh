# Source this ON the GPU machine, in the repo root, after the four staging calls (docs/gpu_runbook.md):
#   source scripts/gpu_env.sh
# Installs the staged wheels into /tmp/site, puts src/ on the path, restores the default corpus and checks the
# pinned tokenizer against its golden ids.
mkdir -p ~/stage && cp .stage/p0/*.whl ~/stage/ 2>/dev/null
for first in ~/stage/*.whl.part00; do  # join the pieces of .stage/s1..s8 (scripts/stage_gpu.sh)
  [ -e "$first" ] || break
  whl=${first%.part00}; cat "$whl".part* > "$whl.tmp" && mv "$whl.tmp" "$whl" && rm -f "$whl".part*
done
if [ "$(ls ~/stage/*.whl 2>/dev/null | wc -l)" -lt 6 ]; then
  echo "gpu_env: ~/stage holds $(ls ~/stage/*.whl 2>/dev/null | wc -l) of 6 wheels: restage s1..s8 (docs/gpu_runbook.md)" >&2
  return 1 2>/dev/null || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ~/stage/*.whl
export PYTHONPATH=/tmp/site:$PWD/src CACHEAUG_HOME=/tmp/cah PYTHONUNBUFFERED=1
mkdir -p $CACHEAUG_HOME/data/default && cp .stage/data/*.jsonl.gz $CACHEAUG_HOME/data/default/ 2>/dev/null
cp ~/stage/broad/*.jsonl.gz $CACHEAUG_HOME/data/default/ 2>/dev/null  # the broad corpus' own sources, when staged
python3 -c "from cacheaug.base import load_gemma3_tokenizer; load_gemma3_tokenizer(); print('gpu_env: tokenizer golden ids ok')"
