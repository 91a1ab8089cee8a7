#!/usr/bin/env bash
# Idempotent set-up of a clone: .venv with the packages (pip: torch/torchvision come from
# this machine's wheels), WordNet for NLTK (offline, from Debian's packages), and the
# C++ (and, where nvcc is present, CUDA) extension. A second run only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
say() { echo "[setup] $*"; }

if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi

# Packages: reinstalled only when requirements.txt changes.
want=$(sha256sum requirements.txt | cut -c1-16)
if [ "$(cat "$VENV/.abd_requirements" 2>/dev/null)" != "$want" ]; then
  say "installing packages with pip (about 2 minutes, 6 GB)"
  "$PY" -m pip install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither a file" >&2)
  echo "$want" > "$VENV/.abd_requirements"
fi

# WordNet for EDA: NLTK looks in <venv>/nltk_data. Files are copied (NLTK refuses links
# outside its data path) and the lexnames index is generated from the man page.
WN=$VENV/nltk_data/corpora/wordnet
if [ ! -f "$WN/lexnames" ]; then
  if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
    say "installing WordNet (Debian packages wordnet-base, wordnet-sense-index)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base wordnet-sense-index \
      >/dev/null || { echo "[setup] could not install WordNet: run 'apt-get install wordnet-base wordnet-sense-index' as root" >&2; exit 1; }
  fi
  mkdir -p "$WN.tmp"
  find /usr/share/wordnet -maxdepth 1 -type f -exec cp {} "$WN.tmp/" \;
  zcat /usr/share/man/man5/lexnames.5WN.gz | "$PY" -c '
import re, sys
cat = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
rows = [m.groups() for m in (re.match(r"^(\d\d)\s+((adj|adv|noun|verb)\.\w+)", l) for l in sys.stdin) if m]
assert [int(i) for i, _, _ in rows] == list(range(45)), "unexpected lexnames man page"
sys.stdout.write("".join(f"{i}\t{name}\t{cat[pos]}\n" for i, name, pos in rows))
' > "$WN.tmp/lexnames"
  rm -rf "$WN" && mv "$WN.tmp" "$WN"
  say "WordNet ready in $WN"
fi

# Extension: rebuilt when setup.py or csrc/ change (ninja recompiles only what changed).
src_hash=$(cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.abd_extension" 2>/dev/null)" != "$src_hash" ] || ! ls abd_fast/_C.*.so >/dev/null 2>&1; then
  say "building the extension (about 1 minute for C++, 1-2 more for CUDA)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2> >(grep -v "is ignored: it is neither a file" >&2)
  echo "$src_hash" > "$VENV/.abd_extension"
fi
