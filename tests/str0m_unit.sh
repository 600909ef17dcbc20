#!/usr/bin/env bash
# str0m's own unit tests (its `#[cfg(test)]` modules), run against the vendored, patched copy in
# vendor/str0m. The copy ships without str0m's dev-dependencies and test data (SLUICE.md), so
# this builds a scratch copy beside the build output that has them back:
#   - the dev-dependencies its unit tests use (serde_json, systemstat, tracing-subscriber);
#   - only the crypto backend sluice builds (aws-lc-rs): as the root package, str0m would
#     otherwise have to resolve its other, optional backends too;
#   - an empty docs/chrome-sdp.json, because two SDP tests read upstream's captured Chrome SDP,
#     which is not vendored; those two are skipped.
# The workspace's Cargo.lock is copied in, so every shared dependency is the same version and
# its build is reused. Exits non-zero if a test fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
COPY="$TARGET/str0m-unit"

rm -rf "$COPY"
mkdir -p "$COPY/docs"
cp -r vendor/str0m/src vendor/str0m/Cargo.toml "$COPY/"
cp Cargo.lock "$COPY/"
echo '{}' >"$COPY/docs/chrome-sdp.json"

python3 - "$COPY/Cargo.toml" <<'PY'
import re, sys
path = sys.argv[1]
s = open(path).read()
# Drop the optional crypto backends sluice does not build, and the features naming them.
# A section runs from its header to the next one.
s = re.sub(r"(?m)^\[(target\.[^\]]*\.)?dependencies\.str0m-"
           r"(openssl|rust-crypto|apple-crypto|wincrypto)\][^\[]*", "", s)
for feature in ("apple-crypto", "openssl", "openssl-dimpl", "rust-crypto", "vendored",
                "wincrypto", "wincrypto-dimpl"):
    s = re.sub(r"\n" + re.escape(feature) + r" = \[[^\]]*\]", "", s)
if "str0m-openssl" in s or "wincrypto" in s or "apple-crypto" in s:
    sys.exit("str0m_unit.sh: an unbuilt crypto backend is still in Cargo.toml; update the script")
s += """
[dev-dependencies]
serde_json = "1"
systemstat = "0.2"
tracing-subscriber = { version = "0.3", features = ["env-filter"] }

[workspace]
"""
open(path, "w").write(s)
PY

cd "$COPY"
CARGO_TARGET_DIR="$TARGET" cargo test --lib -- \
    --skip sdp::data::test::fast_and_easy_parse_agree \
    --skip sdp::data::test::invalid_sdp_keeps_the_detailed_error
