"""Documents, characters and Gemma 3 tokens per source of a built corpus (docs/guide.md's tables).

cacheaug data prepare && python experiments/corpus_stats.py
cacheaug data prepare --corpus broad && python experiments/corpus_stats.py broad
"""

import gzip
import json
import sys

from cacheaug.base import load_gemma3_tokenizer
from cacheaug.corpus import CORPORA, default_dir

tok = load_gemma3_tokenizer()
total = [0, 0, 0]
for name in CORPORA[sys.argv[1] if len(sys.argv) > 1 else "default"]:
    docs = [json.loads(line)["text"] for line in gzip.open(default_dir() / f"{name}.jsonl.gz", "rt")]
    tokens = sum(
        sum(map(len, tok(docs[i : i + 256], add_special_tokens=False)["input_ids"])) for i in range(0, len(docs), 256)
    )
    row = [len(docs), sum(map(len, docs)), tokens]
    total = [a + b for a, b in zip(total, row)]
    print(f"{name:8s} documents {row[0]:6d}  characters {row[1]:11,d}  tokens {row[2]:11,d}")
print(f"{'all':8s} documents {total[0]:6d}  characters {total[1]:11,d}  tokens {total[2]:11,d}")
